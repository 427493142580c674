"""`splitkeras privacy audit | epsilon` and `splitkeras train --defence`: results, and one-line
errors for the user's mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from client_support import DATA, make_split_folder

from splitkeras.cli import main


def test_epsilon_prints_the_accountants_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "epsilon", "--sigma", "1.0", "--epochs", "10"]) == 0
    assert capsys.readouterr().out == "epsilon 19.0536 for delta 1e-05 (sigma 1, 10 epochs, shuffle batches)\n"
    assert main(["privacy", "epsilon", "--sigma", "1.0", "--epochs", "10", "--sampling", "poisson",
                 "--samples", "1000", "--batch-size", "32", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] < 19.05


@pytest.mark.parametrize("argv,code,message", [
    (["privacy", "epsilon", "--sigma", "0", "--epochs", "3"], 1, "error: sigma must be > 0 for a finite epsilon"),
    (["privacy", "epsilon", "--sigma", "1", "--epochs", "3", "--sampling", "poisson"], 1,
     "error: sampling='poisson' needs samples and batch_size"),
    (["privacy", "audit", "SPLIT", "--data", "DATA", "--test", "DATA", "--defence", "blur:2"], 1,
     "error: unknown defence 'blur'; use one of: max-norm[:STRENGTH], gradient-noise:SCALE"),
    (["privacy", "audit", "SPLIT", "--data", "DATA", "--test", "DATA", "--defence", "nopeek"], 1,
     "error: defence 'nopeek': write it as nopeek:ALPHA, e.g. nopeek:1.0"),
    (["privacy", "audit", "SPLIT", "--data", "DATA", "--test", "DATA", "--image-shape", "8y8"], 2,
     "error: privacy audit: --image-shape '8y8' must be HxW or HxWxC, e.g. 8x8"),
    (["train", "SPLIT", "--server", "http://127.0.0.1:9", "--data", "DATA", "--key", "k",
      "--defence", "max-norm:x"], 2, "error: train: --defence: defence 'max-norm:x': write it as max-norm[:STRENGTH]"),
    (["privacy"], 2, "error: splitkeras privacy: the following arguments are required: SUBCOMMAND"),
])
def test_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                               message: str) -> None:
    folder = make_split_folder(tmp_path / "split", "u_shaped")
    np.savez(tmp_path / "data.npz", x=DATA[0], y=DATA[1])
    argv = [str(folder) if a == "SPLIT" else str(tmp_path / "data.npz") if a == "DATA" else a for a in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err


def test_audit_attacks_a_split_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_split_folder(tmp_path / "split", "u_shaped")
    x, y = DATA
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:32], y=y[:32])
    np.savez(tmp_path / "aux.npz", x=np.random.default_rng(5).standard_normal((64, 6)).astype("float32"))
    picture = tmp_path / "pictures.png"
    assert main(["privacy", "audit", str(folder), "--data", str(tmp_path / "train.npz"), "--test",
                 str(tmp_path / "test.npz"), "--aux", str(tmp_path / "aux.npz"), "--defence", "max-norm",
                 "--defence", "nopeek:0.5", "--epochs", "2", "--batch-size", "16", "--image-shape", "2x3",
                 "--pictures", str(picture), "--decoder-epochs", "5", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "u_shaped"
    assert report["defences"] == ["MaxNorm(strength=1.0, seed=0)", "NoPeek(alpha=0.5)"]
    assert set(report["labels"]) == {"recovery_accuracy", "chance", "majority_class"}
    assert set(report["reconstruction"]) == {"mse", "mse_mean_guess", "ssim"}
    assert 0 <= report["test_accuracy"] <= 1 and picture.read_bytes()[:4] == b"\x89PNG"
