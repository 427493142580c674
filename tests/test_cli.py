"""The `splitkeras` command line: split, inspect, join.

A few tests run the real console script in a subprocess (each pays ~4 s of
TensorFlow start-up); the rest call `splitkeras.cli.main([...])` in-process.
A user's mistake prints exactly one line on stderr, starting with `error:`,
and exits with 1 (refused model, cut or file) or 2 (usage); never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from models import max_abs_diff, model_outputs, multi_io_model, residual_model, sample_inputs

import splitkeras
from splitkeras.cli import main

SCRIPT = Path(sys.executable).parent / "splitkeras"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "residual.keras"
    residual_model().save(path)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script, in the environment a user would have (no TF log settings)."""
    script = str(SCRIPT) if SCRIPT.exists() else shutil.which("splitkeras")
    assert script, "the splitkeras console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


# ---- the console script (subprocess) ------------------------------------------------------------------
def test_script_split_then_join(model_file: Path, tmp_path: Path) -> None:
    split = run_cli("split", str(model_file), "--at", "block2_relu1", "-o", "out", "--no-tfjs", cwd=tmp_path)
    assert split.returncode == 0, split.stderr
    assert split.stderr == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["head.keras", "split.json", "tail.keras"]
    assert split.stdout.splitlines() == [
        "Split 'residual_model' at block2_relu1 into out/",
        "  head     device           556 params  -> block1_out, block2_relu1",
        "  tail     server           163 params  -> logits",
        "Manifest: out/split.json",
    ]
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert manifest["source"]["file"] == "residual.keras"

    join = run_cli("join", "out", "-o", "joined.keras", cwd=tmp_path)
    assert join.returncode == 0, join.stderr
    assert join.stdout.strip() == "Joined 2 segments of 'residual_model' into joined.keras"
    joined = keras.models.load_model(tmp_path / "joined.keras")
    model = residual_model()
    inputs = sample_inputs(model)
    assert max_abs_diff(model_outputs(model, inputs), model_outputs(joined, inputs)) <= 1e-6


def test_script_error_is_one_line(model_file: Path, tmp_path: Path) -> None:
    result = run_cli("split", str(model_file), "--at", "block2_relu", "-o", "out", "--no-tfjs", cwd=tmp_path)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        "error: Model 'residual_model' has no layer named 'block2_relu'. "
        "Did you mean 'block2_relu1' or 'block1_relu1' or 'block2_out'?"
    )
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_script_usage_error_is_one_line(model_file: Path, tmp_path: Path) -> None:
    result = run_cli("split", str(model_file), cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        "error: splitkeras split: the following arguments are required: --at "
        "(see `splitkeras split --help`)"
    )


def test_script_inspect_json(model_file: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", str(model_file), "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "residual_model"
    assert [row["layer"] for row in data["cuts"]][:2] == ["stem", "block1_conv1"]


def test_help_loads_neither_tensorflow_nor_the_server() -> None:
    """`splitkeras --help` and each command's --help answer at once: the command modules
    import TensorFlow, the server and uvicorn only when a command runs."""
    code = ("import sys\n"
            "from splitkeras.cli import COMMANDS, main\n"
            "names = [m.__name__.rpartition('.')[2] for m in COMMANDS]\n"
            "for argv in [['--help']] + [[name, '--help'] for name in names]:\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 0, argv\n"
            "print(names, sorted(m for m in ('tensorflow', 'keras', 'numpy', 'server_app', 'uvicorn', 'httpx')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == (
        "['split', 'inspect', 'join', 'serve', 'demo', 'export', 'plan', 'train', 'privacy'] []")


def test_python_dash_m_runs_the_cli() -> None:
    for module in ("splitkeras", "splitkeras.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                             timeout=60)
        assert (out.returncode, out.stdout, out.stderr) == (0, f"splitkeras {splitkeras.__version__}\n", "")


# ---- in-process --------------------------------------------------------------------------------------
def test_split_json_output(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["split", str(model_file), "--at", "stem", "--at", "block2_out", "-o", str(out),
                 "--no-tfjs", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"] == str(out / "split.json")
    assert data["cuts"] == ["stem", "block2_out"]
    assert [(s["name"], s["placement"]) for s in data["segments"]] == [
        ("head", "device"), ("middle", "server"), ("tail", "device"),
    ]
    assert {k: v for k, v in data.items() if k != "manifest"} == json.loads((out / "split.json").read_text())


def test_split_default_output_folder(model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["split", str(model_file), "--at", "stem", "--no-tfjs"]) == 0
    assert (tmp_path / "residual_split" / "split.json").exists()


def test_split_placement_option(model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["split", str(model_file), "--at", "stem", "--placement", "device,device",
                 "-o", str(out), "--no-tfjs"]) == 0
    loaded = splitkeras.load_split(out)
    assert [(s.name, s.placement) for s in loaded.segments] == [("head", "device"), ("tail", "device")]
    # the first segment reads the model inputs: it cannot go to a server
    assert main(["split", str(model_file), "--at", "stem", "--placement", "server,device",
                 "-o", str(tmp_path / "refused"), "--no-tfjs"]) == 1
    assert capsys.readouterr().err.strip().startswith(
        "error: The first segment 'head' is placed on the server, but it reads the model inputs")
    assert not (tmp_path / "refused").exists()


def test_split_warns_when_raw_input_leaves_the_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    multi_io_model().save(tmp_path / "multi.keras")
    assert main(["split", str(tmp_path / "multi.keras"), "--at", "meta_dense", "-o", str(tmp_path / "out"),
                 "--no-tfjs"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: Segment 'tail' (server) takes the raw model input(s) ['image']")


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["split", "{model}", "--at", "stem", "--placement", "device,server,server", "--no-tfjs", "-o", "{tmp}/o"],
         1, "error: 1 cut(s) make 2 segments, but 2 names and 3 placements were given. Give one per segment."),
        (["split", "{model}", "--at", "logits", "--no-tfjs", "-o", "{tmp}/o"],
         1, "error: The cut at 'logits' leaves the last segment empty: every layer of model 'residual_model' "
            "is at or before it. Cut at a layer before the model outputs."),
        (["split", "{model}", "--at", "image", "--no-tfjs", "-o", "{tmp}/o"],
         1, "error: Cannot cut at input layer 'image': the segment before it would be empty. Cut at a layer after it."),
        (["split", "{tmp}/missing.keras", "--at", "stem", "--no-tfjs"],
         1, "error: Model file '{tmp}/missing.keras' does not exist."),
        (["inspect", "{tmp}/missing.h5"], 1, "error: Model file '{tmp}/missing.h5' does not exist."),
        (["join", "{tmp}"],
         1, "error: No split manifest at '{tmp}/split.json'. Create one with "
            "`splitkeras split MODEL --at LAYER -o {tmp}`."),
        (["split", "{model}", "--at", "stem", "-o", "{model}", "--no-tfjs"], 1, "error: File exists: {model}"),
        ([], 2, "error: splitkeras: the following arguments are required: COMMAND (see `splitkeras --help`)"),
        (["split", "{model}", "--at", "stem", "--bogus"],
         2, "error: splitkeras: unrecognized arguments: --bogus (see `splitkeras --help`)"),
        (["inspect", "{model}", "--format", "yaml"],
         2, "error: splitkeras inspect: argument --format: invalid choice: 'yaml' (choose from ..."),
    ],
    ids=["placements", "empty-tail", "input-cut", "missing-model", "inspect-missing", "join-no-manifest",
         "output-is-a-file", "no-command", "unknown-option", "bad-format"],
)
def test_errors_print_one_line(argv: list[str], code: int, message: str, model_file: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def fill(text: str) -> str:
        return text.replace("{model}", str(model_file)).replace("{tmp}", str(tmp_path))

    assert main([fill(a) for a in argv]) == code
    captured = capsys.readouterr()
    if message.endswith("..."):  # the rest is worded by argparse, differently across Pythons
        assert one_error_line(captured.err).startswith(fill(message)[:-3])
    else:
        assert one_error_line(captured.err) == fill(message)
    assert captured.out == ""


def test_join_refuses_an_unknown_output_suffix(model_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["split", str(model_file), "--at", "stem", "-o", str(out), "--no-tfjs"]) == 0
    capsys.readouterr()
    assert main(["join", str(out), "-o", str(tmp_path / "joined.txt")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: join: output '{tmp_path / 'joined.txt'}' must end in .keras or .h5"
    )


def test_join_a_split_with_a_missing_segment_file(model_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["split", str(model_file), "--at", "stem", "-o", str(out), "--no-tfjs"]) == 0
    (out / "head.keras").unlink()
    capsys.readouterr()
    assert main(["join", str(out)]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: Segment 'head' names 'head.keras', which is missing from '{out}'."
    )


@pytest.fixture(scope="module")
def chain_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-segment split device,server,server,device (a chain of two servers), no TF.js."""
    folder = tmp_path_factory.mktemp("chain") / "out"
    x = keras.Input((6,), name="features")
    y = x
    for index in range(1, 4):
        y = keras.layers.Dense(4, activation="tanh", name=f"d{index}")(y)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(y))
    model.compile(optimizer="sgd", loss="mse")
    splitkeras.split(model, at=["d1", "d2", "d3"], placements=["device", "server", "server", "device"]
                     ).save(folder)
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "{out}"], "error: This split has 2 server segments (middle_1, middle_2): serve each in its "
         "own process, with --segment NAME (e.g. --segment middle_1)."),
        (["serve", "{out}", "--segment", "head"], "error: Segment 'head' runs on the device, not on a server. "
         "Server segments: middle_1, middle_2."),
        (["serve", "{out}", "--segment", "nope"], "error: The split has no segment named 'nope' (server "
         "segments: middle_1, middle_2)."),
        (["serve", "{out}", "--segment", "middle_1"], "error: Segment 'middle_1' is followed by server "
         "segment 'middle_2' in a chain: give the URL of the server of 'middle_2' with --next URL."),
        (["serve", "{out}", "--segment", "middle_2", "--next", "http://127.0.0.1:1"], "error: Segment "
         "'middle_2' is not followed by another server segment: --next is only for a chain"),
        (["train", "{out}", "--server", "http://127.0.0.1:1", "--server", "http://127.0.0.1:2", "--data",
          "{out}/none.npz", "--key", "k"], "error: train: --server 'http://127.0.0.1:1': with several servers "
         "give each as NAME=URL"),
        (["train", "{out}", "--server", "middle_1=http://127.0.0.1:1", "--server", "middle_1=http://x:2",
          "--data", "{out}/none.npz", "--key", "k"], "error: train: --server names 'middle_1' twice"),
    ],
    ids=["two-servers-no-segment", "device-segment", "unknown-segment", "chain-needs-next", "next-without-chain",
         "several-urls-without-names", "a-name-twice"],
)
def test_chain_flag_mistakes_print_one_line(argv: list[str], message: str, chain_folder: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.replace("{out}", str(chain_folder)) for a in argv]
    if args[0] == "train":  # the data file must exist for the flags to be looked at
        np.savez(chain_folder / "none.npz", x=np.zeros((4, 6), np.float32), y=np.zeros((4, 2), np.float32))
    assert main(args) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_train_server_urls() -> None:
    from splitkeras.cli.train import server_urls

    assert server_urls(["http://127.0.0.1:8000"]) == "http://127.0.0.1:8000"
    assert server_urls(["middle_1=http://a:1", "middle_3=http://b:2"]) == {"middle_1": "http://a:1",
                                                                         "middle_3": "http://b:2"}
    assert server_urls(["middle_1=http://a:1"]) == {"middle_1": "http://a:1"}
