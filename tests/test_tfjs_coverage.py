"""keras.applications on the device: the coverage table and a short form of its sweep.

`benchmarks/tfjs_coverage.py` exports the head (~20% through) and the U-shaped tail (~80%) of
every keras.applications architecture and checks them in real TF.js against Keras (predict,
training-pass gradients against Keras float32 and float64, BatchNorm statistics); its results are
committed in `benchmarks/results/tfjs_coverage.json` (the full sweep takes ~40 min on 2 cores).
Here:

* `docs/tfjs-coverage.md` is rendered from those results (regenerate it with
  `SPLITKERAS_WRITE_COVERAGE_DOC=1 pytest tests/test_tfjs_coverage.py`);
* the committed results cover all 18 architectures and meet every floor;
* a short form of the sweep runs now: the segments that use most of the runtime's classes
  (MobileNetV3Small: keras.ops nodes, hard_silu, GlobalAveragePooling keepdims; ConvNeXtTiny:
  Normalization, the nested Sequential stem, grouped 7x7 convolutions, LayerScale, ops.add;
  EfficientNetB0's head: Rescaling + Normalization).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import tfjs_coverage as coverage  # noqa: E402
from tfjs_coverage_doc import render_markdown  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "tfjs_coverage.json"
DOC = REPO / "docs" / "tfjs-coverage.md"
# architecture -> the segments the short form checks (cheap on the TF.js CPU backend)
SHORT = {"MobileNetV3Small": ("head",), "ConvNeXtTiny": ("head", "tail"), "EfficientNetB0": ("head",)}


def _results() -> dict:
    return json.loads(RESULTS.read_text())


def test_the_coverage_doc_is_rendered_from_the_committed_results() -> None:
    text = render_markdown(_results())
    if os.environ.get("SPLITKERAS_WRITE_COVERAGE_DOC") == "1":
        DOC.write_text(text)
    assert DOC.read_text() == text, ("docs/tfjs-coverage.md is not what benchmarks/results/tfjs_coverage.json "
                                     "renders; regenerate it: SPLITKERAS_WRITE_COVERAGE_DOC=1 pytest "
                                     "tests/test_tfjs_coverage.py")


def test_the_committed_sweep_covers_every_architecture_and_meets_the_floors() -> None:
    data = _results()
    assert list(data["architectures"]) == list(coverage.ARCHITECTURES)
    assert data["floors"] == coverage.FLOORS and data["noise_margin"] == coverage.NOISE_MARGIN
    for name, row in data["architectures"].items():
        for part in ("head", "tail"):
            figures = row[part]
            assert "error" not in figures, f"{name} {part}: {figures.get('error')}"
            assert figures["predict"] <= coverage.FLOORS["predict"], (name, part)
            assert coverage.passes(figures), f"{name} {part}: {figures}"


def test_a_short_sweep_in_real_tfjs(tmp_path: Path) -> None:
    if shutil.which("node") is None or not (REPO / "mobile_export" / "node_modules" / "@tensorflow").is_dir():
        pytest.fail("node and `npm ci --prefix mobile_export` are needed for the TF.js tests")
    # ConvNeXt normalizes with LayerNormalization (per sample): its tail needs no BatchNorm-sized batch
    data = coverage.check_architectures(list(SHORT), work=tmp_path, parts=SHORT, batch={"head": 3, "tail": 3})
    for name, parts in SHORT.items():
        for part in parts:
            figures = data["architectures"][name][part]
            print(f"{name} {part}: predict {figures.get('predict'):.2g}, gradient vs Keras "
                  f"{figures.get('gradient_vs_keras'):.2g} (vs float64 {figures.get('gradient'):.2g}), "
                  f"BN statistics {figures.get('moving_statistics'):.2g}, TF.js {figures.get('tfjs_seconds')} s")
            assert coverage.passes(figures), f"{name} {part}: {figures}"
            assert figures["gradient_vs_keras"] <= coverage.FLOORS["gradient"], (name, part)
    classes = {c for name, parts in SHORT.items() for part in parts
               for c in data["architectures"][name][part]["runtime_classes"]}
    assert {"SplitkerasOperation", "SplitkerasGlobalAveragePooling2D", "SplitkerasNormalization",
            "SplitkerasConv2D", "SplitkerasLayerScale"} <= classes
