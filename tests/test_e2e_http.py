"""End to end over a real socket: `splitkeras serve` in a subprocess on 127.0.0.1, the
Python `DeviceClient` in this process, the in-process `SplitTrainer` as the reference.

One U-shaped server lives through the whole U-shaped story, and the reference follows
it step for step, so every phase starts from equal weights and optimizer states:

(a) two epochs over HTTP end within 1e-5 of in-process training;
(d) SIGTERM mid-step (after a forward, before its backward), restart: the server resumes
    from its shutdown checkpoint with the pending forward rebuilt from its log, the device
    carries on without resending anything, still within 1e-5;
(e) kill -9 mid-step, restart (checkpoint every step): the same, within 1e-5;
(c) a float16 session trains on and stays close to float32 in process (diffs printed).

(b) runs a single cut (labels on the server) on a second server, then `splitkeras train`.
Server starts dominate the time (TensorFlow imports), so there are four in all, the first
two overlapped. Servers are always stopped by the fixture's finalizer.
"""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_support import DATA, assert_same_training, make_split_folder
from live_server import KEY, Server

import splitkeras

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EPOCH = dict(batch_size=16, shuffle=False, verbose=0)



@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both servers start at once (their start-ups overlap); stopped whatever happens."""
    root = tmp_path_factory.mktemp("e2e")
    started: list[Server] = []
    try:
        entries: dict[str, Any] = {}
        for mode, every in (("u_shaped", 1), ("labels_on_server", 100)):
            template = make_split_folder(root / f"{mode}-template", mode)
            folder = Path(shutil.copytree(template, root / mode))
            server = Server(folder, checkpoint_every=every).start()
            started.append(server)
            entries[mode] = (server, template)
        yield entries
    finally:
        for server in started:
            server.stop(signal.SIGTERM, timeout=20)  # killed if it does not stop in time


def _device(server: Server, wire_dtype: str = "float32") -> Any:
    from splitkeras.client import DeviceClient, Transport

    # A generous retry budget: a restarted server takes a TensorFlow import to come back.
    transport = Transport(server.url, key=KEY, retries=150, backoff=0.05, max_backoff=1.0)
    return DeviceClient(server.folder, server.url, transport=transport, wire_dtype=wire_dtype)


def _bytes_per_step(before: Any, after: Any) -> tuple[float, float]:
    steps = after.steps - before.steps
    return ((after.bytes_sent - before.bytes_sent) / steps,
            (after.bytes_received - before.bytes_received) / steps)


def _after_forward(client: Any, device_step: int, action: Callable[[], None]) -> None:
    """Run `action` right after the server answered the forward of `device_step`: the step
    is pending on the server, its backward not sent yet."""
    transport = client.transport
    original = transport.forward

    def forward(step: int, tensors: Any) -> Any:
        result = original(step, tensors)
        if step == device_step:
            action()
        return result

    transport.forward = forward


@pytest.fixture(scope="module")
def u_story(servers: dict[str, Any]) -> dict[str, Any]:
    """The U-shaped server, its device and the in-process reference, shared by the phases."""
    server, template = servers["u_shaped"]
    server.wait_ready()
    reference = splitkeras.load_split(template)
    client = _device(server)
    client.compile()
    return {"server": server, "reference": reference, "client": client, "diffs": {}}


def test_a_u_shaped_two_epochs_match_in_process(u_story: dict[str, Any]) -> None:
    client, reference = u_story["client"], u_story["reference"]
    client.open_session()
    before = client.stats
    history = client.fit(*DATA, epochs=2, **EPOCH)
    u_story["bytes_per_step"] = _bytes_per_step(before, client.stats)
    expected = reference.fit(*DATA, epochs=2, **EPOCH)
    u_story["diffs"]["a"] = assert_same_training(client, history, reference, expected)
    assert u_story["server"].wait_ready()["applied_steps"] == 8


def test_d_sigterm_mid_step_resumes_from_the_shutdown_checkpoint(u_story: dict[str, Any]) -> None:
    server, client, reference = u_story["server"], u_story["client"], u_story["reference"]
    before = server.wait_ready()["applied_steps"]
    recoveries = client.transport.stats.recoveries
    codes: list[int] = []

    def restart() -> None:
        codes.append(server.stop(signal.SIGTERM))
        server.start()  # not waited for: the device's retries wait

    _after_forward(client, client.stats.steps + 1, restart)
    history = client.fit(*DATA, epochs=1, **EPOCH)
    expected = reference.fit(*DATA, epochs=1, **EPOCH)
    u_story["diffs"]["d"] = assert_same_training(client, history, reference, expected)
    state = server.wait_ready()
    assert codes in ([0], [-signal.SIGTERM]) and server.starts == 2  # uvicorn re-raises SIGTERM
    assert state["resumed_from"] == before + 1  # the graceful checkpoint had every applied step
    assert state["applied_steps"] == before + 4  # the pending step was applied once
    # the shutdown checkpoint logged the pending forward again: its tape came back, no resend
    assert client.transport.stats.recoveries == recoveries


def test_e_kill_9_mid_step_resumes_from_the_last_checkpoint(u_story: dict[str, Any]) -> None:
    server, client, reference = u_story["server"], u_story["client"], u_story["reference"]
    before = server.wait_ready()["applied_steps"]

    def crash() -> None:
        server.stop(signal.SIGKILL)
        server.start()

    _after_forward(client, client.stats.steps + 2, crash)
    history = client.fit(*DATA, epochs=1, **EPOCH)
    expected = reference.fit(*DATA, epochs=1, **EPOCH)
    u_story["diffs"]["e"] = assert_same_training(client, history, reference, expected)
    state = server.wait_ready()
    assert server.starts == 3
    assert state["resumed_from"] == before + 2  # checkpointed after every applied step
    assert state["applied_steps"] == before + 4


def test_c_float16_wire_trains_and_stays_close(u_story: dict[str, Any]) -> None:
    client, reference = u_story["client"], u_story["reference"]
    client.transport.close_session()
    client.wire_dtype = "float16"  # a float16 session; the weights and optimizer states go on
    client.open_session()
    before = client.stats
    history = client.fit(*DATA, epochs=2, **EPOCH)
    bytes_per_step = _bytes_per_step(before, client.stats)
    expected = reference.fit(*DATA, epochs=2, **EPOCH)
    diffs = assert_same_training(client, history, reference, expected, tolerance=2e-2)
    assert client.transport.session["wire_dtype"] == "float16"
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert bytes_per_step[0] < 0.7 * u_story["bytes_per_step"][0]
    u_story["diffs"]["c"] = diffs
    print(f"\nfloat16 vs float32 in process: {diffs}; bytes per step sent/received "
          f"{bytes_per_step} (float32: {u_story['bytes_per_step']})")
    print(f"float32 phases: a {u_story['diffs']['a']}, d {u_story['diffs']['d']}, "
          f"e {u_story['diffs']['e']}; bytes per step sent/received {u_story['bytes_per_step']}")
    client.close()


def test_b_labels_on_server_over_http_matches_in_process(servers: dict[str, Any], tmp_path: Path,
                                                         capsys: Any) -> None:
    from splitkeras.cli import main

    server, template = servers["labels_on_server"]
    server.wait_ready()
    reference = splitkeras.load_split(template)
    with _device(server) as client:
        client.compile()
        history = client.fit(*DATA, epochs=2, **EPOCH)
        expected = reference.fit(*DATA, epochs=2, **EPOCH)
        diffs = assert_same_training(client, history, reference, expected)
    with capsys.disabled():
        print(f"\nlabels on server: {diffs}")
    # The train command against the same server: progress, then the device segment saved back.
    np.savez(tmp_path / "data.npz", x=DATA[0], y=DATA[1])
    head = server.folder / "head.keras"
    stamp = head.stat().st_mtime_ns
    code = main(["train", str(server.folder), "--server", server.url, "--data",
                 str(tmp_path / "data.npz"), "--epochs", "1", "--key", KEY, "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert report["stats"]["steps"] == 2 and report["saved"] == [str(head)]
    assert report["stats"]["bytes_sent"] > 0 and np.isfinite(report["final"]["loss"])
    assert head.stat().st_mtime_ns != stamp
    assert server.wait_ready()["applied_steps"] == 10
