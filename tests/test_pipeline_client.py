"""Pipelining on the Python device (`DeviceClient.fit(pipeline_depth=N)`, docs/training.md
"Pipelining"): the scheduler's order on fake runners; the shared emulated link; through the
in-process app at depth 2 and 4, every step applied once (with every first answer lost) and
the same numbers as an in-process reference that runs the same stale schedule in the order
the server ran it; the cap by the server's max_pending_steps; one real uvicorn server.
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_support import DATA, make_split_folder
from live_server import KEY as E2E_KEY
from live_server import Server
from test_client import DroppingTransport

from splitkeras.client import DeviceClient, NetworkConditions, Transport
from splitkeras.client.pipeline import PipelinedSteps
from splitkeras.errors import TrainingError

KEY = "pipeline-key"


# ---- the schedule on fake runners ------------------------------------------------------------------
class Done:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class FakeRunner:
    """Records every call in `log`; outputs = inputs + 1, input gradients = output gradients."""

    def __init__(self, name: str, log: list[str], inputs: list[str], outputs: list[str],
                 labels: bool = False) -> None:
        self.name, self.log, self.input_names, self.output_names = name, log, inputs, outputs
        self.holds_labels = labels

    def forward(self, step: int, inputs: list[Any]) -> list[Any]:
        self.log.append(f"{self.name}.forward({step})")
        return [x + 1 for x in inputs]

    def pending_regularization(self, step: int) -> float:
        return 0.0

    def backward(self, step: int, grads: list[Any]) -> list[Any]:
        self.log.append(f"{self.name}.backward({step})")
        return list(grads)

    def train_step(self, step: int, inputs: list[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        self.log.append(f"{self.name}.train({step})")
        return [1.0 for _ in inputs], {"loss": float(step)}

    def drop(self, step: int) -> None:
        self.log.append(f"{self.name}.drop({step})")


def fake_pipeline(depth: int, log: list[str]) -> PipelinedSteps:
    runners = [FakeRunner("head", log, ["x"], ["h"]), FakeRunner("server", log, ["h"], ["m"]),
               FakeRunner("tail", log, ["m"], ["out"], labels=True)]
    return PipelinedSteps(runners, depth, 1, submit=lambda fn, *args: Done(fn(*args)))


@pytest.mark.parametrize("depth", [2, 3])
def test_the_schedule_keeps_depth_steps_in_flight_and_finishes_them_in_order(depth: int) -> None:
    log: list[str] = []
    steps = fake_pipeline(depth, log)
    done = [step for k in range(5) for step, _ in steps.push(k, {"x": 0.0}, None)]
    assert done == list(range(5 - depth + 1))
    done += [step for step, _ in steps.flush()]
    assert done == list(range(5))
    expected: list[str] = []
    for k in range(5 + depth - 1):  # push(k) then finish k - depth + 1
        if k < 5:
            expected += [f"head.forward({k})", f"server.forward({k})"]
        j = k - depth + 1
        if j >= 0:
            expected += [f"tail.train({j})", f"server.backward({j})", f"head.backward({j})"]
    assert log == expected


def test_a_failed_step_drops_every_step_in_flight() -> None:
    log: list[str] = []
    steps = fake_pipeline(3, log)
    steps.push(0, {"x": 0.0}, None)
    steps.push(1, {"x": 0.0}, None)
    steps.label.train_step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore
    with pytest.raises(RuntimeError, match="boom"):
        steps.push(2, {"x": 0.0}, None)
    drops = [entry for entry in log if ".drop(" in entry]
    assert drops == [f"{r}.drop({k})" for k in range(3) for r in ("head", "server", "tail")]
    assert not steps.in_flight


def test_pipeline_depth_is_validated() -> None:
    from splitkeras.client.pipeline import check_depth

    for bad in (0, 5, 2.0, "2", True):
        with pytest.raises(ValueError, match=r"pipeline_depth must be a whole number from 1 \(no "
                                             r"pipelining\) to 4, got"):
            check_depth(bad)


# ---- the shared emulated link ----------------------------------------------------------------------
def _concurrently(*calls: Callable[[], Any]) -> list[float]:
    """Run `calls` at once; the seconds each took from the common start."""
    ended = [0.0] * len(calls)
    start = time.monotonic()

    def run(i: int) -> None:
        calls[i]()
        ended[i] = time.monotonic() - start

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ended


def test_concurrent_transfers_share_the_bandwidth_of_one_direction_only_latency_overlaps() -> None:
    link = NetworkConditions(latency_s=0.05, bandwidth_bps=8e6)  # 250 kB: 0.25 s on the wire
    size = 250_000
    same = sorted(_concurrently(lambda: link.wait(size, "up"), lambda: link.wait(size, "up")))
    assert same[0] >= 0.30 and same[1] >= 0.55  # the second waits for the first's transfer
    assert same[1] < 0.55 + 0.2  # but not for its latency
    both = _concurrently(lambda: link.wait(size, "up"), lambda: link.wait(size, "down"))
    assert all(0.30 <= t < 0.30 + 0.2 for t in both)  # up and down are separate
    alone = NetworkConditions(latency_s=0.05, bandwidth_bps=8e6)
    started = time.monotonic()
    assert alone.wait(size) == pytest.approx(0.30, abs=0.01)  # one at a time: delay(bytes), as before
    assert time.monotonic() - started >= 0.30
    with pytest.raises(ValueError, match="direction must be one of"):
        link.wait(1, "sideways")


# ---- through the in-process app --------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split_folder(tmp_path_factory.mktemp("splits") / "u", "u_shaped")


def _server(folder: Path, max_pending_steps: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from server_app import ServerSettings, create_app

    return TestClient(create_app(ServerSettings(split_dir=folder, key=KEY, checkpoint_every=1000,
                                                max_pending_steps=max_pending_steps)))


def _record_server_order(server: Any) -> list[tuple[str, int]]:
    """What the server's executor ran, in order (retries answered from the cache run nothing)."""
    executor, order = server.app.state.service.executor, []

    def recorder(kind: str) -> Callable[[Any, Any], Any]:
        run = getattr(executor, kind)

        def recording(key: Any, tensors: Any) -> Any:
            answer = run(key, tensors)
            order.append((kind, key[1]))
            return answer
        return recording

    for kind in ("forward", "backward"):
        setattr(executor, kind, recorder(kind))
    return order


class ReplayedServer:
    """The server segment in process, running its forwards and backwards in `order` (the
    server's): a result is computed when the device needs it, after everything the server ran
    before it."""

    def __init__(self, runner: Any, order: list[tuple[str, int]]) -> None:
        self.runner, self.order = runner, deque(order)
        self.input_names, self.output_names, self.holds_labels = runner.input_names, runner.output_names, False
        self.inbox: dict[tuple[str, int], Any] = {}
        self.answers: dict[tuple[str, int], Any] = {}

    def _until(self, wanted: tuple[str, int]) -> Any:
        while wanted not in self.answers:
            kind, step = op = self.order.popleft()
            self.answers[op] = getattr(self.runner, kind)(step, self.inbox.pop(op))
        return self.answers.pop(wanted)

    def submit(self, function: Any, step: int, inputs: Any) -> Any:
        self.inbox[("forward", step)] = inputs
        return Lazy(lambda: self._until(("forward", step)))

    def forward(self, step: int, inputs: Any) -> Any:  # never called: `submit` stands for it
        raise AssertionError("the pipeline sends forwards through submit")

    def pending_regularization(self, step: int) -> Any:
        return self.runner.pending_regularization(step)

    def backward(self, step: int, grads: Any) -> Any:
        self.inbox[("backward", step)] = grads
        return self._until(("backward", step))

    def drop(self, step: int) -> None:
        self.runner.drop(step)


class Lazy:
    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute

    def result(self) -> Any:
        return self.compute()


def _reference(template: Path, depth: int, order: list[tuple[str, int]], epochs: int) -> Any:
    """In process, from the same weights: the same batches through the same schedule, with the
    server segment's forwards and backwards in the server's order."""
    import splitkeras
    from splitkeras.training import SplitTrainer, model_inputs_by_name

    split = splitkeras.load_split(template)
    trainer = SplitTrainer.from_training_config(split, split.training_config)
    trainer.fused = False
    server = ReplayedServer(trainer.runners[1], order)
    steps = PipelinedSteps([trainer.runners[0], server, trainer.runners[2]], depth, 1, submit=server.submit)
    x, y = DATA
    step = 0
    for _ in range(epochs):
        for begin in range(0, len(x), 16):
            trainer._ensure_built(y[begin:begin + 16])
            steps.push(step, model_inputs_by_name(split, x[begin:begin + 16]), y[begin:begin + 16])
            step += 1
        steps.flush()
    assert not server.order and not server.inbox  # every step the server ran, once
    return trainer


def _max_diff(left: list[np.ndarray], right: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(left, right))


@pytest.mark.parametrize("depth", [2, 4])
def test_pipelined_training_over_http_equals_the_same_stale_schedule_in_process(
        template: Path, tmp_path: Path, depth: int) -> None:
    folder = Path(shutil.copytree(template, tmp_path / "split"))
    with _server(folder, max_pending_steps=depth) as server:
        order = _record_server_order(server)
        transport = Transport("http://testserver", key=KEY, retries=2, backoff=0.0,
                              http_transport=DroppingTransport(server._transport))
        client = DeviceClient(folder, "http://testserver", transport=transport)
        client.compile()
        history = client.fit(*DATA, batch_size=16, epochs=2, shuffle=False, verbose=0, pipeline_depth=depth)
        assert client.transport.stats.retries >= 16  # every forward and backward answer lost once
        ready = server.get("/readyz", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert ready["applied_steps"] == 8  # 2 epochs x 4 batches, each once
        assert sorted(order) == sorted([("forward", k) for k in range(8)] + [("backward", k) for k in range(8)])
        assert [k for kind, k in order if kind == "backward"] == list(range(8))  # FIFO
        state = client.transport.session_state()
        assert state["pending_steps"] == [] and state["applied_steps"] == 8
        served = server.app.state.service.runner.model.get_weights()
        reference = _reference(template, depth, order, epochs=2)
        assert _max_diff(served, reference.runners[1].model.get_weights()) == 0.0
        for name, runner in (("head", reference.runners[0]), ("tail", reference.runners[2])):
            assert _max_diff(client.split[name].model.get_weights(), runner.model.get_weights()) == 0.0
        assert np.all(np.isfinite(history.history["loss"]))
        client.close()
    import splitkeras

    sequential = splitkeras.load_split(template)
    sequential.fit(*DATA, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert _max_diff(served, sequential["middle"].model.get_weights()) > 1e-4  # the staleness is real


def test_the_depth_is_capped_by_the_servers_max_pending_steps(template: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(template, tmp_path / "split"))
    with _server(folder, max_pending_steps=2) as server:
        client = DeviceClient(folder, "http://testserver",
                              transport=Transport("http://testserver", key=KEY, http_transport=server._transport))
        client.compile()
        with pytest.warns(UserWarning, match=r"pipeline_depth=4\): the server lets a session pipeline 2 "
                                             r"step\(s\).*training at depth 2"):
            client.fit(*DATA, batch_size=16, epochs=1, shuffle=False, verbose=0, pipeline_depth=4)
        assert client.transport.session_state()["applied_steps"] == 4
        with pytest.raises(ValueError, match="pipeline_depth must be a whole number"):
            client.fit(*DATA, batch_size=16, epochs=1, verbose=0, pipeline_depth=5)
        client.close()


def test_a_sequential_device_that_abandoned_a_step_goes_on_in_a_new_session(template: Path, tmp_path: Path) -> None:
    """A server that pipelines accepts the next forward beside the abandoned step; the backward
    is then refused (an older step is pending): the transport opens a new session, resends the
    forward and goes on; the abandoned step is never applied."""
    folder = Path(shutil.copytree(template, tmp_path / "split"))
    with _server(folder, max_pending_steps=4) as server:
        transport = Transport("http://testserver", key=KEY, http_transport=server._transport)
        transport.open_session()
        first = transport.session["session_id"]
        h = {"encode": np.ones((2, 5), np.float32)}
        transport.forward(0, h)
        transport._forward_bodies.clear()  # the device was interrupted: step 0 is given up
        outputs, _ = transport.forward(1, h)
        grads = transport.backward(1, {name: np.ones_like(v) for name, v in outputs.items()})
        assert set(grads) == {"encode"} and transport.session["session_id"] != first
        assert transport.stats.recoveries == 1  # one recovery: a new session, the forward resent in it
        assert transport.session_state()["applied_steps"] == 1
        transport.close()


def test_pipelining_refuses_a_split_with_the_labels_on_the_server(tmp_path: Path) -> None:
    folder = make_split_folder(tmp_path / "l", "labels_on_server")
    client = DeviceClient(folder, "http://127.0.0.1:9", key=KEY)
    client.compile()
    with pytest.raises(TrainingError, match=r"fit\(pipeline_depth=2\) needs a U-shaped split with one "
                                            r"server stage \(labels on the device\)"):
        client.fit(*DATA, batch_size=16, epochs=1, verbose=0, pipeline_depth=2)


# ---- a real server ---------------------------------------------------------------------------------
def test_pipelined_training_against_a_real_server(template: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(template, tmp_path / "split"))
    server = Server(folder, checkpoint_every=3, args=["--max-pending-steps", "3"]).start()
    try:
        server.wait_ready()
        link = NetworkConditions(latency_s=0.01)
        with DeviceClient(folder, server.url, key=E2E_KEY, network=link) as client:
            client.compile()
            history = client.fit(*DATA, batch_size=8, epochs=1, shuffle=False, verbose=0, pipeline_depth=3)
            state = client.transport.session_state()
            assert state["applied_steps"] == 8 and state["pending_steps"] == [] and state["next_step"] == 8
            assert client.transport.session["max_pending_steps"] == 3
            assert np.all(np.isfinite(history.history["loss"]))
    finally:
        server.stop()
