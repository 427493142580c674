"""`--compress SPEC` on the command line: a bad SPEC is one line and exit status 2 before
anything starts; `splitkeras demo --compress ... --format json` trains over a real server
with the codecs and prints its table as JSON (the bytes per training sample fall)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitkeras.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["train", "nowhere", "--server", "http://127.0.0.1:9"], ["demo"]])
@pytest.mark.parametrize(("spec", "message"), [
    ("topk:0.050", "the top-k fraction '0.050' is not a decimal in (0, 1]"),
    ("float8", "Unknown codec 'float8'"),
    ("forward=int8,sideways=int8", "'sideways=int8' is not forward=CODEC or backward=CODEC"),
])
def test_a_bad_compress_spec_is_one_line_and_exit_2(command: list[str], spec: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--compress", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_serve_refuses_an_unknown_codec_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path), "--codecs", "float32,zip"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zip" in err and "Traceback" not in err


@pytest.mark.e2e
def test_demo_trains_compressed_and_prints_json(tmp_path: Path) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "splitkeras.cli", "demo", "-o", str(tmp_path / "demo"),
                          "--epochs", "1", "--compress", "forward=int8,backward=topk:0.05+int8",
                          "--format", "json"], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout)
    assert table["compress"] == "forward=int8,backward=topk:0.05+int8"
    assert {"split_accuracy", "central_accuracy", "bytes_sent_per_sample", "bytes_received_per_sample",
            "split_seconds_per_sample", "central_seconds_per_sample"} <= table.keys()
    # float32 sends the 8x8x32 conv_2 activations (8,192 bytes a sample) and receives their
    # gradients: int8 up (2,048) and 5% top-k+int8 down are under a third of that
    assert table["bytes_sent_per_sample"] < 8192 / 3
    assert table["bytes_received_per_sample"] < 8192 / 8
    assert 0.0 <= table["split_accuracy"] <= 1.0
