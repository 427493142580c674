"""Every keras.applications architecture, its head and tail exported to TF.js and checked there.

For each architecture Keras ships (`weights=None`, the smallest input each allows, 10 classes),
the model is cut with `splitkeras.split` about 20% and about 80% through its layers (the first
layer at or after that point where a cut is possible), so that the head (model input -> first
cut) and the U-shaped tail (second cut -> output) run on the device. Both are exported with
`converters.export_tfjs`, run in the real `@tensorflow/tfjs` 4.22 (pure-JS CPU backend,
`mobile_export/tools/tfjs_predict.mjs`) and compared with Keras:

* predict (inference): max |TF.js - Keras| over the outputs / max |Keras output| (floor 1e-5);
* the training pass: the VJP of sum(outputs * g), g random, for every trainable weight and the
  segment's inputs, in training mode (BatchNorm on batch statistics; Dropout rates set to 0),
  per weight max |TF.js - Keras| / max |Keras| (floor 1e-4), against Keras float32 (the
  figure asked for) and against the same Keras model computed in float64;
* the BatchNorm moving statistics after that pass: max |TF.js - Keras| (floor 1e-5).

Float32 itself cannot always resolve these gradients. A training-mode BatchNorm normalizes each
channel over batch x height x width values; deep in these networks (1x1 or 2x2 feature maps at
their minimum input) a channel whose values nearly coincide turns float32 rounding into a large
relative error, and a stack of such layers amplifies it (measured: Keras float32 vs float64 off by
1e-3 to > 1 in some tails, with identical weights and inputs). Where that is so, no float32
implementation can agree with another to 1e-4, so each weight is judged against the float-noise
level Keras float32 itself shows: it passes when TF.js is within 1e-4 of Keras (float32 or
float64), or within NOISE_MARGIN (10) times Keras float32's own deviation from float64 for that
weight (the larger of its own and the segment's median deviation: one float32 run is one
sample of that noise), "at noise level" in the table. The same holds for the input gradients, the weights
whose true gradient is zero (max |float64 gradient| <= 1e-7 of the segment's largest: a bias
feeding a training-mode BatchNorm), held to max(1e-6 of the segment's largest gradient, 10x
Keras' noise), and the moving statistics. To keep the problem resolvable where cheap: tails run
on a batch of 16 (heads 3), and the tails of the MobileNets (V2, V3) and EfficientNets run at a
96x96 input (3x3 at the second cut, see TAIL_INPUT). Kinks: where a ReLU input or a max-pooling
window's two largest values sit within float32 rounding of each other, TF.js and TF may route that
element's gradient differently (a valid subgradient either way), which moves every gradient
upstream of it by up to a few percent; a head holds about a million such elements and about one
in a million sits that close. So each segment runs first on the input draw (of 3) farthest from a
max-pooling tie, and again on the next draw if it fails; a real fault fails every draw, and the
figures of every draw run are kept in the JSON ("draws"). Weights are seeded (reproducible).

The weights are Keras' random initialization, with the BatchNorm gammas and betas, LayerScale
factors and Normalization statistics drawn at random too (so that none is the identity), and the
BatchNorm moving statistics calibrated on a separate batch of 32 images, as a trained network's fit
its data (`calibrate`; rows measured before this have `"statistics": "random"` in the JSON, drawn
at random instead, which is what made most of the "at noise level" passes).
Inputs: images in [0, 255) for architectures that preprocess in the graph
(Rescaling/Normalization), N(0, 1) otherwise; the tail's inputs are the Keras activations of
those images at the second cut.

Run: `.venv/bin/python benchmarks/tfjs_coverage.py [--only ResNet50 VGG16]` (~40 min for all 18
on 2 shared cores; the TF.js CPU backend's convolution gradients are a naive loop). Writes
`results/tfjs_coverage.{json,md}`; `tests/test_tfjs_coverage.py` renders `docs/tfjs-coverage.md`
from the JSON and checks it, and runs a short form of this sweep.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tfjs_coverage_reference import (  # noqa: E402
    FLOORS,
    NOISE_MARGIN,
    _as_list,
    compare,
    keras_reference,
    passes,
)

# architecture -> smallest input side keras.applications accepts with weights=None
ARCHITECTURES: dict[str, int] = {
    "Xception": 71, "VGG16": 32, "VGG19": 32, "ResNet50": 32, "ResNet101": 32, "ResNet50V2": 32,
    "ResNet101V2": 32, "InceptionV3": 75, "InceptionResNetV2": 75, "MobileNet": 32, "MobileNetV2": 32,
    "MobileNetV3Small": 32, "MobileNetV3Large": 32, "DenseNet121": 32, "NASNetMobile": 32,
    "EfficientNetB0": 32, "EfficientNetV2B0": 32, "ConvNeXtTiny": 32,
}
# The tails of these run at 96 x 96 (3 x 3 at the second cut) instead: at their minimum input their
# tail works on 1 x 1 feature maps, where a training-mode BatchNorm stack is chaotic in float32
# (Keras' own float32 gradients are off its float64 ones by 20-200%, see the module docstring).
TAIL_INPUT = {"MobileNetV2": 96, "MobileNetV3Small": 96, "MobileNetV3Large": 96, "EfficientNetB0": 96,
              "EfficientNetV2B0": 96}
# The family members not swept (same building blocks, more of them): ResNet152(V2), DenseNet169/201,
# NASNetLarge, EfficientNetB1-B7, EfficientNetV2B1-B3/S/M/L, ConvNeXtSmall/Base/Large/XLarge.
BATCH = {"head": 3, "tail": 16}  # the tails run at 1x1 or 2x2: BatchNorm needs more than 3 samples
CALIBRATE = True  # BatchNorm moving statistics from the data (calibrate), not random
CALIBRATION_BATCH = 32
DRAWS = 3  # input draws per segment; the one whose max-pooling windows are farthest from a tie runs
CUTS = (0.2, 0.8)
TOOL = ROOT / "mobile_export" / "tools" / "tfjs_predict.mjs"
RESULTS = HERE / "results"


def build(name: str, size: int) -> keras.Model:
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)


def prepare(model: keras.Model, seed: int) -> None:
    """Random BatchNorm statistics and affine weights, LayerScale factors, Normalization stats."""
    rng = np.random.default_rng(seed)

    def layers(m: keras.Model) -> list[Any]:
        out = []
        for layer in m.layers:
            out += layers(layer) if isinstance(layer, keras.Model) else [layer]
        return out

    for layer in layers(model):
        kind = type(layer).__name__
        for variable in layer.weights:
            shape, name = tuple(variable.shape), variable.name
            if kind == "BatchNormalization" and name in ("moving_variance", "gamma"):
                variable.assign(rng.uniform(0.8, 1.2, shape).astype("float32"))
            elif kind == "BatchNormalization" and name in ("moving_mean", "beta"):
                variable.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
            elif kind == "LayerScale":
                variable.assign(rng.uniform(0.2, 1.0, shape).astype("float32"))
            elif kind == "Normalization" and name in ("mean", "variance"):
                value = rng.uniform(100.0, 140.0, shape) if name == "mean" else rng.uniform(2500.0, 4000.0, shape)
                variable.assign(value.astype("float32"))
        if kind == "Normalization":
            layer.finalize_state()


def _all_layers(model: keras.Model) -> list[Any]:
    out = []
    for layer in model.layers:
        out += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def calibrate(model: keras.Model, images: np.ndarray) -> None:
    """BatchNorm moving statistics that fit the data, as a trained network's do: each one's input
    batch mean and variance over `images` in one training-mode pass (momentum 0; every BatchNorm
    must be trainable then, else Keras runs it in inference mode). Random statistics instead leave
    many channels nearly constant over a batch deep in the network (the inference-mode activations
    a tail receives): there a training-mode BatchNorm divides rounding noise by a tiny deviation and
    float32 cannot resolve the gradients (Keras float32 off float64 by up to 1e+1; calibrated, the
    MobileNet and MobileNetV3Small tails drop from 1.4e+1 and 5.1e-3 to 1.3e-6 and 1.5e-6)."""
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def _images(model: keras.Model, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Images in [0, 255) where the architecture preprocesses in the graph, else N(0, 1)."""
    shape = (batch, *model.input_shape[1:])
    return (rng.uniform(0.0, 255.0, shape) if preprocesses(model) else rng.normal(0.0, 1.0, shape)).astype(np.float32)


def preprocesses(model: keras.Model) -> bool:
    return any(type(layer).__name__ in ("Rescaling", "Normalization") for layer in model.layers[:4])


def pick_cuts(model: keras.Model, fractions: tuple[float, float] = CUTS) -> tuple[list[str], Any]:
    """The first layers at or after `fractions` of model.layers where splitkeras can cut."""
    import splitkeras
    from splitkeras.errors import CutError

    names = [layer.name for layer in model.layers]

    def candidates(fraction: float) -> list[str]:
        start = max(1, int(round(fraction * (len(names) - 1))))
        return names[start:-1]

    first_error = None
    for first in candidates(fractions[0])[:60]:
        for second in candidates(fractions[1])[:60]:
            if names.index(second) <= names.index(first):
                continue
            try:
                return [first, second], splitkeras.split(model, at=[first, second])
            except CutError as error:
                first_error = first_error or error
                continue
    raise RuntimeError(f"no cut found near {fractions} of {model.name}: {first_error}")


def _encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(data).decode()}


def _pool_gap(model: keras.Model, inputs: list[np.ndarray]) -> float:
    """The smallest relative gap between the two largest values of a max-pooling window (training
    pass): below float32 rounding, TF.js and TF may route that window's gradient differently."""
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)
             and np.prod(layer.pool_size) > 1]  # ResNetV2's 1x1 max pooling has no ties
    if not pools:
        return float("inf")
    probe = keras.Model(model.inputs, [layer.input for layer in pools])
    values = _as_list(probe(inputs if len(inputs) > 1 else inputs[0], training=True))
    gap = float("inf")
    for layer, value in zip(pools, values):
        x = np.asarray(value)
        (kh, kw), (sh, sw) = layer.pool_size, layer.strides
        if layer.padding == "same":
            pads = [(0, 0)] + [((max((-(-n // st) - 1) * st + k - n, 0)) // 2,
                                max((-(-n // st) - 1) * st + k - n, 0) - (max((-(-n // st) - 1) * st + k - n, 0)) // 2)
                               for n, k, st in ((x.shape[1], kh, sh), (x.shape[2], kw, sw))] + [(0, 0)]
            x = np.pad(x, pads, constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
        windows = np.sort(windows.reshape(-1, kh * kw), axis=1)
        top, second = windows[:, -1], windows[:, -2]
        finite = np.isfinite(second)
        rel = (top[finite] - second[finite]) / np.maximum(np.abs(top[finite]), 1e-30)
        gap = min(gap, float(rel.min()) if rel.size else gap)
    return gap


def _segment_inputs(model: keras.Model, split: Any, part: str, batch: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Images for the head; for the tail, Keras' activations of images at the second cut."""
    images = _images(model, batch, rng)
    values = {split.segments[0].inputs[0].name: images}
    if part == "tail":
        for segment in split.segments[:-1]:
            feed = [values[s.name] for s in segment.inputs]
            outs = _as_list(segment.model(feed if len(feed) > 1 else feed[0], training=False))
            values.update({spec.name: np.asarray(o) for spec, o in zip(segment.outputs, outs)})
    segment = split.segments[0] if part == "head" else split.segments[-1]
    return [values[s.name] for s in segment.inputs]


def _run_node(jobs: list[dict[str, Any]], work: Path, tag: str, timeout: float) -> None:
    job_file, out_file = work / f"{tag}_jobs.json", work / f"{tag}_results.json"
    job_file.write_text(json.dumps({"jobs": jobs}))
    done = subprocess.run(["node", str(TOOL), str(job_file), str(out_file)], cwd=TOOL.parents[1],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"tfjs_predict.mjs failed on {tag}:\n{done.stderr[-3000:]}")


def _check_one(name: str, index: int, batch: dict[str, int], seed: int, work: Path,
               timeout: float, parts: tuple[str, ...] = ("head", "tail")) -> dict[str, Any]:
    """Both segments of one architecture. Each runs on the input draw farthest from a max-pooling
    tie; one that fails runs again on the next draw (up to DRAWS): two float32 implementations
    also disagree where a ReLU input or a max-pooling window sits within rounding of its kink
    (about one such element in a million, and a head holds about a million), which moves that
    element's gradient and every gradient upstream of it; a real fault fails on every draw."""
    from converters import export_tfjs

    started = time.perf_counter()
    sizes = {"head": ARCHITECTURES[name], "tail": TAIL_INPUT.get(name, ARCHITECTURES[name])}
    row: dict[str, Any] = {"input": sizes["head"], "tail_input": sizes["tail"],
                           "statistics": "calibrated" if CALIBRATE else "random"}
    states: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part == parts[0] or sizes["tail"] != sizes["head"]:
            keras.utils.clear_session()  # the same automatic layer names in both builds
            keras.utils.set_random_seed(1000 * seed + index)
            model = build(name, sizes[part])
            prepare(model, seed + index)
            if CALIBRATE:
                calibrate(model, _images(model, CALIBRATION_BATCH, np.random.default_rng([seed, index, 99])))
            cuts, split = pick_cuts(model)
            row.update(layers=len(model.layers), cuts=cuts, parameters=int(model.count_params()))
        segment = split.segments[0] if part == "head" else split.segments[-1]
        seg_model = segment.model
        for layer in seg_model.layers:  # Dropout at rate 0 for the comparison
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        rng = np.random.default_rng([seed, index, part == "tail"])
        draws = [_segment_inputs(model, split, part, batch[part], rng) for _ in range(DRAWS)]
        gaps = [_pool_gap(seg_model, inputs) for inputs in draws]
        order = [int(i) for i in np.argsort(gaps)[::-1]]
        bundle = work / f"{name}_{part}"
        export_tfjs(seg_model, bundle)
        topology = json.loads((bundle / "model.json").read_text())["modelTopology"]["model_config"]
        custom = sorted({layer["class_name"] for layer in topology["config"]["layers"]
                         if layer["class_name"].startswith("Splitkeras")})
        states[part] = {"model": seg_model, "draws": [draws[i] for i in order], "gaps": [gaps[i] for i in order],
                        "saved": [np.asarray(v) for v in seg_model.non_trainable_weights], "rng": rng,
                        "bundle": bundle, "tried": []}
        row[part] = {"layers": len(seg_model.layers), "parameters": int(seg_model.count_params()),
                     "runtime_classes": custom, "batch": batch[part], "input": sizes[part],
                     "feature_map": [list(a.shape[1:-1]) for a in draws[0]] if part == "tail" else None}
    row["keras_seconds"] = round(time.perf_counter() - started, 1)
    pending = list(parts)
    for attempt in range(DRAWS):
        jobs = []
        for part in pending:
            state = states[part]
            for variable, value in zip(state["model"].non_trainable_weights, state["saved"]):
                variable.assign(value)  # the exported statistics (a reference pass moves them)
            state["reference"] = keras_reference(state["model"], state["draws"][attempt], state["rng"])
            jobs.append({"id": part, "bundle_dir": str(state["bundle"]),
                         "inputs": [_encode(a) for a in state["draws"][attempt]],
                         "upstream": [_encode(g) for g in state["reference"]["upstream"]],
                         "return_weights": "non_trainable", "result_file": str(work / f"{name}_{part}.json")})
        _run_node(jobs, work, name, timeout)
        still = []
        for part in pending:
            state = states[part]
            result = json.loads((work / f"{name}_{part}.json").read_text())
            figures = compare(state["reference"], result)
            figures["ok"] = passes(figures)
            gap = state["gaps"][attempt]
            state["tried"].append({key: figures.get(key) for key in ("ok", "gradient_vs_keras", "gradient",
                                                                     "keras_float32_error", "input_gradient")}
                                  | {"pool_gap": None if gap == float("inf") else gap})
            if figures["ok"] or attempt == DRAWS - 1:
                row[part].update(figures, draws=state["tried"], tfjs_seconds=result.get("seconds"),
                                 pool_gap=None if gap == float("inf") else gap)
            else:
                still.append(part)
        pending = still
        if not pending:
            break
    return row


def check_architectures(names: list[str], *, batch: dict[str, int] | None = None, seed: int = 0,
                        work: Path | None = None, parts: dict[str, tuple[str, ...]] | None = None,
                        timeout: float = 3000.0, log: Any = None) -> dict[str, Any]:
    """Export, run in TF.js and compare the head and tail of each architecture; figures by name.
    One node process per architecture (its results can be large: VGG's tail has 19M weights)."""
    work = Path(work or tempfile.mkdtemp(prefix="tfjs_coverage_"))
    rows: dict[str, Any] = {}
    for index, name in enumerate(names):
        rows[name] = _check_one(name, index, batch or BATCH, seed, work, timeout,
                                (parts or {}).get(name, ("head", "tail")))
        if log:
            row = rows[name]
            seconds = {part: row[part].get("tfjs_seconds") for part in ("head", "tail") if part in row}
            oks = {part: row[part].get("ok") for part in ("head", "tail") if part in row}
            print(f"{name}: cut at {row['cuts']}, Keras {row['keras_seconds']} s, TF.js {seconds} s; ok {oks}",
                  file=log, flush=True)
        for stale in work.glob(f"{name}_*"):  # bundles and results can be hundreds of MB
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale)
            else:
                stale.unlink()
    return {"architectures": rows, "batch": batch or BATCH, "floors": FLOORS, "noise_margin": NOISE_MARGIN}


def main() -> None:
    from tfjs_coverage_doc import render_markdown

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="architectures (default: all); merged into the results")
    parser.add_argument("--head-batch", type=int, default=BATCH["head"])
    parser.add_argument("--tail-batch", type=int, default=BATCH["tail"])
    args = parser.parse_args()
    names = args.only or list(ARCHITECTURES)
    path = RESULTS / "tfjs_coverage.json"
    data: dict[str, Any] = {"architectures": {}}
    if args.only and path.exists():
        data = json.loads(path.read_text())
    RESULTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    for name in names:  # written after each architecture: a long sweep keeps what it measured
        one = check_architectures([name], batch={"head": args.head_batch, "tail": args.tail_batch}, log=sys.stderr,
                                  seed=list(ARCHITECTURES).index(name))
        data["architectures"][name] = one["architectures"][name]
        data["architectures"] = {n: data["architectures"][n] for n in ARCHITECTURES if n in data["architectures"]}
        data.update({key: value for key, value in one.items() if key != "architectures"},
                    keras=keras.__version__, tensorflow=tf.__version__,
                    onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                    seconds=round(time.perf_counter() - started, 1))
        path.write_text(json.dumps(data, indent=1, default=float) + "\n")
        (RESULTS / "tfjs_coverage.md").write_text(render_markdown(data))
    print(render_markdown(data))


if __name__ == "__main__":
    main()
