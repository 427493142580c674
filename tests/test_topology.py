"""The topology: stages, chains, interfaces and what each server serves, in Python and
in JS (`mobile_export/src/topology.js` must derive the same stages from the same file)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from splitkeras.errors import ManifestError
from splitkeras.manifest import Manifest
from splitkeras.tensor_spec import TensorSpec
from splitkeras.topology import Topology

REPO = Path(__file__).resolve().parents[1]


def _spec(name: str) -> dict[str, Any]:
    return {"name": name, "shape": [None, 2], "dtype": "float32"}


def manifest(placements: list[str], io: list[tuple[list[str], list[str]]],
             model_inputs: tuple[str, ...] = ("x",), model_outputs: tuple[str, ...] = ("y",)) -> Manifest:
    names = ["head"] + [f"middle_{i}" for i in range(1, len(placements) - 1)] + ["tail"]
    if len(placements) == 2:
        names = ["head", "tail"]
    return Manifest.from_json({
        "format": "splitkeras.split", "format_version": 2, "source": {"file": None},
        "cuts": [f"c{i}" for i in range(len(placements) - 1)],
        "model_inputs": [_spec(n) for n in model_inputs],
        "model_outputs": [_spec(n) for n in model_outputs],
        "segments": [{"name": name, "placement": placement, "keras_file": f"{name}.keras",
                      "inputs": [_spec(n) for n in ins], "outputs": [_spec(n) for n in outs],
                      "parameters": 1}
                     for name, placement, (ins, outs) in zip(names, placements, io)],
        "training": None,
    })


# A skip from the head to the tail (s), a tensor (a) read by two later segments, a chain.
CASES = {
    "single": (["device", "server"], [(["x"], ["h"]), (["h"], ["y"])]),
    "u_shaped": (["device", "server", "device"], [(["x"], ["h", "s"]), (["h"], ["m"]), (["m", "s"], ["y"])]),
    "chain": (["device", "server", "server", "device"],
              [(["x"], ["h", "s"]), (["h"], ["a", "b"]), (["a", "b"], ["c"]), (["c", "s"], ["y"])]),
    "chain_passthrough": (["device", "server", "server", "device"],
                          [(["x"], ["h", "g"]), (["h"], ["a"]), (["a", "g"], ["c"]), (["c", "a"], ["y"])]),
    "interleaved": (["device", "server", "device", "server", "device"],
                    [(["x"], ["h"]), (["h"], ["a"]), (["a"], ["d"]), (["d", "a"], ["e"]), (["e"], ["y"])]),
    "chain_with_labels": (["device", "server", "server"], [(["x"], ["h"]), (["h"], ["a"]), (["a"], ["y"])]),
}


def _stages(topology: Topology) -> list[dict[str, Any]]:
    return [{"kind": s.kind, "name": s.name, "segments": list(s.segments),
             "inputs": [t.name for t in s.inputs], "outputs": [t.name for t in s.outputs],
             "holds_labels": s.holds_labels} for s in topology.stages]


def test_stages_and_interfaces() -> None:
    chain = Topology.from_manifest(manifest(*CASES["chain"]))
    assert _stages(chain) == [
        {"kind": "device", "name": "head", "segments": ["head"], "inputs": ["x"], "outputs": ["h", "s"],
         "holds_labels": False},
        {"kind": "server", "name": "middle_1", "segments": ["middle_1", "middle_2"], "inputs": ["h"],
         "outputs": ["c"], "holds_labels": False},
        {"kind": "device", "name": "tail", "segments": ["tail"], "inputs": ["c", "s"], "outputs": ["y"],
         "holds_labels": True}]
    assert chain.mode == "u_shaped" and chain.label_segment == "tail"
    assert chain.hosts == ["device", "middle_1", "middle_2", "device"]
    assert Topology.from_manifest(manifest(*CASES["single"])).mode == "labels_on_server"
    assert Topology.from_manifest(manifest(["device", "device"], CASES["single"][1])).mode == "local"


def test_what_each_server_of_a_chain_serves() -> None:
    """The first server serves the whole chain; the second its rest. A tensor the device sends
    that only the second server reads (g) passes through the first; one the first produces
    that the tail reads (a) comes back from the first."""
    topology = Topology.from_manifest(manifest(*CASES["chain_passthrough"]))
    first, second = topology.served("middle_1"), topology.served("middle_2")
    assert (first.next, [s.name for s in first.inputs], [s.name for s in first.outputs]) == \
        ("middle_2", ["h", "g"], ["a", "c"])
    assert ([s.name for s in first.next_inputs], [s.name for s in first.next_outputs]) == (["a", "g"], ["c"])
    assert (second.next, [s.name for s in second.inputs], [s.name for s in second.outputs]) == \
        (None, ["a", "g"], ["c"])
    assert first.mode == second.mode == "u_shaped"
    labels = Topology.from_manifest(manifest(*CASES["chain_with_labels"]))
    assert labels.served("middle_1").mode == "labels_on_server" and labels.served("middle_1").next == "tail"
    with pytest.raises(ManifestError, match="Segment 'head' runs on the device, not on a server"):
        topology.served("head")
    with pytest.raises(ManifestError, match="The split has no segment named 'nope'"):
        topology.served("nope")


def test_a_first_segment_on_a_server_is_refused() -> None:
    with pytest.raises(ManifestError, match="The first segment 'head' is placed on the server"):
        Topology([_Seg("head", "server", ["x"], ["h"]), _Seg("tail", "device", ["h"], ["y"])],
                 [TensorSpec("x", (None, 2), "float32")], [TensorSpec("y", (None, 2), "float32")])


class _Seg:
    def __init__(self, name: str, placement: str, ins: list[str], outs: list[str]) -> None:
        self.name, self.placement = name, placement
        self.inputs = [TensorSpec(n, (None, 2), "float32") for n in ins]
        self.outputs = [TensorSpec(n, (None, 2), "float32") for n in outs]


def test_javascript_derives_the_same_stages(tmp_path: Path) -> None:
    """topology.js and topology.py agree on every case (names, order, labels, mode)."""
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH; install Node.js 20 to run the JS tests")
    files = {}
    for name, (placements, io) in CASES.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(manifest(placements, io).to_json()))
        files[name] = str(path)
    script = (
        "import { deriveTopology } from './src/topology.js';\n"
        "import { readFileSync } from 'node:fs';\n"
        "const files = JSON.parse(process.argv[1]); const out = {};\n"
        "for (const [name, file] of Object.entries(files)) {\n"
        "  const t = deriveTopology(JSON.parse(readFileSync(file, 'utf8')));\n"
        "  out[name] = { mode: t.mode, stages: t.stages.map((s) => ({ kind: s.kind, name: s.name,\n"
        "    segments: s.segments, inputs: s.inputs.map((x) => x.name),\n"
        "    outputs: s.outputs.map((x) => x.name), holds_labels: s.holdsLabels })) };\n"
        "}\nconsole.log(JSON.stringify(out));\n")
    done = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(files)],
                          cwd=REPO / "mobile_export", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    js = json.loads(done.stdout)
    for name, (placements, io) in CASES.items():
        topology = Topology.from_manifest(manifest(placements, io))
        assert js[name] == {"mode": topology.mode, "stages": _stages(topology)}, name
