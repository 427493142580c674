"""Micro-batching across devices (`--batch-window-ms`; server_app.micro_batch, group_steps).

Unit: the `Batcher` (window, K, a retry while it gathers, answers per item). In-process
ASGI: several sessions' forwards and backwards sent concurrently through httpx; each
answer and the new weights equal a reference computed here with the same segment's
`SegmentRunner` on the union batch (one forward, one VJP, one update with
`gradient_scale=1/K`), bit for bit; update counts; retries; a member whose backward never
comes, or is refused; a crash in the middle of a group (the write-ahead log redoes it).
Real server: 4 devices against `splitkeras serve --batch-window-ms` (uvicorn).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import KEY, LiveApp, copy_split, make_split, settings_for, tensor_headers

from server_app.micro_batch import Batcher
from server_app.segment_host import SegmentHost
from splitkeras import wire
from splitkeras.protocol import STEP_HEADER

ROWS = (2, 1, 3)  # the members' batch sizes: the union is split back by rows


# ------------------------------------------------------------------------------------ the batcher
def test_batcher_gathers_within_the_window_and_closes_early_at_k() -> None:
    async def scenario() -> tuple[list[Any], list[int], float]:
        async def run(key: Any, items: list[Any]) -> list[Any]:
            return [f"{key}:{item}:{len(items)}" for item in items]

        batcher = Batcher(run)
        started = time.monotonic()
        full = await asyncio.gather(*(batcher.submit("b", i, i, wait=30.0, expected=3) for i in range(3)))
        early = time.monotonic() - started  # K were in: no wait for the 30 s window
        windowed = await asyncio.gather(batcher.submit("b", 7, 7, wait=0.05, expected=5),
                                        batcher.submit("b", 8, 8, wait=0.05, expected=5))
        return [*full, *windowed], batcher.batches, early

    answers, batches, early = asyncio.run(scenario())
    assert answers == ["b:0:3", "b:1:3", "b:2:3", "b:7:2", "b:8:2"]
    assert batches == [3, 2] and early < 5.0


def test_batcher_retry_while_gathering_shares_the_answer_and_errors_are_per_item() -> None:
    async def scenario() -> tuple[list[Any], list[list[Any]]]:
        seen: list[list[Any]] = []

        async def run(key: Any, items: list[Any]) -> list[Any]:
            seen.append(list(items))
            return [ValueError(f"bad {item}") if item == "bad" else item.upper() for item in items]

        batcher = Batcher(run)
        answers = await asyncio.gather(batcher.submit("b", "a", "ok", wait=0.05, expected=9),
                                       batcher.submit("b", "a", "ok", wait=0.05, expected=9),  # the retry
                                       batcher.submit("b", "z", "bad", wait=0.05, expected=9),
                                       return_exceptions=True)
        return answers, seen

    answers, seen = asyncio.run(scenario())
    assert answers[:2] == ["OK", "OK"] and seen == [["ok", "bad"]]
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "bad bad"


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split(tmp_path_factory.mktemp("micro") / "u", "u_shaped")


def activations(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)


def output_grads(seed: int, rows: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).normal(size=(rows, 3)).astype(np.float32)


class Reference:
    """The same server segment, fresh from the split's files, stepped by hand."""

    def __init__(self, split: Path, folder: Path) -> None:
        self.runner = SegmentHost(settings_for(copy_split(split, folder))).runner

    def group(self, xs: list[np.ndarray], seeds: list[np.ndarray], counted: int) -> tuple[np.ndarray, np.ndarray]:
        self.runner.forward("g", [np.concatenate(xs)])
        outputs = np.asarray(self.runner._pending["g"].outputs[0])
        grads = self.runner.backward("g", [np.concatenate(seeds)], gradient_scale=1.0 / counted)
        return outputs, np.asarray(grads[0])

    def weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.runner.model.variables]


def split_rows(array: np.ndarray, rows: tuple[int, ...]) -> list[np.ndarray]:
    return np.split(array, np.cumsum(rows)[:-1])


def union_order(live: LiveApp, sessions: list[tuple[str, str]]) -> list[int]:
    """The sessions' places in the one open group's union (their forwards' arrival order)."""
    (group,) = live.service.groups.groups.values()
    ids = [sid for sid, _ in sessions]
    return [ids.index(sid) for sid, _ in group.members]


def reference_step(reference: Reference, order: list[int], xs: list[np.ndarray],
                   gs: list[np.ndarray | None], counted: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The reference group in union `order`; (outputs, input gradients) per member, in the
    members' own order. A None gradient: the member counts as zero."""
    seeds = [np.zeros_like(xs[i]) if gs[i] is None else gs[i] for i in order]
    outputs, grads = reference.group([xs[i] for i in order], seeds, counted)
    rows = tuple(len(xs[i]) for i in order)
    by_member_out, by_member_grad = split_rows(outputs, rows), split_rows(grads, rows)
    out: list[np.ndarray] = [np.empty(0)] * len(xs)
    grad: list[np.ndarray] = [np.empty(0)] * len(xs)
    for place, i in enumerate(order):
        out[i], grad[i] = by_member_out[place], by_member_grad[place]
    return out, grad


async def post(live: LiveApp, sid: str, token: str, route: str, step: int, tensors: dict[str, Any]) -> Any:
    return await live.client.post(f"/v1/sessions/{sid}/{route}", content=wire.encode(tensors),
                                  headers={**tensor_headers(token), STEP_HEADER: str(step)})


def concurrently(live: LiveApp, sessions: list[tuple[str, str]], route: str, step: int,
                 bodies: list[dict[str, Any]]) -> list[Any]:
    async def all_of() -> list[Any]:
        return list(await asyncio.gather(*(post(live, sid, token, route, step, body)
                                           for (sid, token), body in zip(sessions, bodies))))

    return live.call(all_of())


def decoded(response: Any, name: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    return wire.decode(response.content)[0][name]


def detail(live: LiveApp) -> dict[str, Any]:
    return dict(live.get("/readyz?detail=1", token=KEY).json())


def model_weights(live: LiveApp) -> list[np.ndarray]:
    return live.on_writer(lambda: [v.numpy() for v in live.service.runner.model.variables])


# ------------------------------------------------------------------------------------ in-process ASGI
def test_group_answers_and_update_equal_the_union_reference(split: Path, tmp_path: Path) -> None:
    reference = Reference(split, tmp_path / "ref")
    xs = [activations(i, r) for i, r in enumerate(ROWS)]
    gs: list[np.ndarray | None] = [output_grads(i, r) for i, r in enumerate(ROWS)]
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=30_000,
                              max_devices_per_batch=3)) as live:
        sessions = [live.open_session() for _ in ROWS]
        forwards = concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
        ref_out, ref_grads = reference_step(reference, union_order(live, sessions), xs, gs, counted=3)
        for response, expected in zip(forwards, ref_out):
            np.testing.assert_array_equal(decoded(response, "m"), expected)
        assert detail(live)["micro_batching"]["open_groups"] == 1
        backwards = concurrently(live, sessions, "backward", 0, [{"m": g} for g in gs])
        for response, expected in zip(backwards, ref_grads):
            np.testing.assert_array_equal(decoded(response, "h"), expected)
        for got, expected in zip(model_weights(live), reference.weights()):
            np.testing.assert_array_equal(got, expected)  # one update: the mean of the 3 steps
        state = detail(live)
        assert (state["applied_steps"], state["updates"]) == (3, 1)
        assert state["micro_batching"]["applied_groups"] == 1
        # retries: the same bytes, nothing runs again
        again = concurrently(live, sessions, "backward", 0, [{"m": g} for g in gs])
        assert [r.content for r in again] == [r.content for r in backwards]
        assert concurrently(live, sessions[:1], "forward", 0, [{"h": xs[0]}])[0].content == forwards[0].content
        assert (detail(live)["applied_steps"], detail(live)["updates"]) == (3, 1)
        for sid, token in sessions:
            assert live.get(f"/v1/sessions/{sid}", token=token).json()["applied_steps"] == 1


def test_the_window_closes_once_every_idle_session_has_sent_its_forward(split: Path, tmp_path: Path) -> None:
    xs = [activations(i, r) for i, r in enumerate(ROWS)]
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=30_000,
                              max_devices_per_batch=8)) as live:
        sessions = [live.open_session() for _ in ROWS]
        started = time.monotonic()
        forwards = concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
        assert time.monotonic() - started < 20  # not the 30 s window: no fourth session can join
        assert [r.status_code for r in forwards] == [200] * 3
        assert live.service.micro.forwards.batches == [3]
        live.open_session()  # an idle session that sends nothing: the next batch waits the window
        assert live.service.micro.expected_forwards() == 1  # the three are pending


def test_a_lone_member_is_the_sequential_step_bit_for_bit(split: Path, tmp_path: Path) -> None:
    x, g = activations(5, 2), output_grads(5, 2)
    answers = []
    for name, extra in (("seq", {}), ("micro", {"batch_window_ms": 10, "max_devices_per_batch": 4})):
        with LiveApp(settings_for(copy_split(split, tmp_path / name), **extra)) as live:
            session = [live.open_session()]
            forward = concurrently(live, session, "forward", 0, [{"h": x}])[0]
            backward = concurrently(live, session, "backward", 0, [{"m": g}])[0]
            answers.append((forward.content, backward.content, model_weights(live), detail(live)["updates"]))
    assert answers[0][:2] == answers[1][:2] and answers[0][3] == answers[1][3] == 1
    for a, b in zip(answers[0][2], answers[1][2]):
        np.testing.assert_array_equal(a, b)


def test_a_member_without_backward_expires_and_the_group_applies_without_it(split: Path, tmp_path: Path) -> None:
    reference = Reference(split, tmp_path / "ref")
    rows = (2, 3)
    xs = [activations(i, r) for i, r in enumerate(rows)]
    g0 = output_grads(0, 2)
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=30_000, max_devices_per_batch=2,
                              batch_backward_timeout_seconds=0.3)) as live:
        sessions = [live.open_session() for _ in rows]
        concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
        _, ref_grads = reference_step(reference, union_order(live, sessions), xs, [g0, None], counted=1)
        started = time.monotonic()
        only = concurrently(live, sessions[:1], "backward", 0, [{"m": g0}])[0]
        assert time.monotonic() - started < 20  # bounded: the group did not wait for the other member
        np.testing.assert_array_equal(decoded(only, "h"), ref_grads[0])
        for got, expected in zip(model_weights(live), reference.weights()):
            np.testing.assert_array_equal(got, expected)
        late = concurrently(live, sessions[1:], "backward", 0, [{"m": output_grads(1, 3)}])[0]
        assert late.status_code == 409 and late.json()["error"]["code"] == "step_expired"
        state = detail(live)
        assert (state["applied_steps"], state["updates"], state["micro_batching"]["open_groups"]) == (1, 1, 0)
        # the expired member sends its forward again: a group of its own this time
        live.service.micro.max_devices = 1
        again = concurrently(live, sessions[1:], "forward", 0, [{"h": xs[1]}])[0]
        assert again.status_code == 200
        assert concurrently(live, sessions[1:], "backward", 0, [{"m": output_grads(1, 3)}])[0].status_code == 200
        assert (detail(live)["applied_steps"], detail(live)["updates"]) == (2, 2)


def test_a_refused_member_counts_as_zero_and_its_step_expires(split: Path, tmp_path: Path) -> None:
    reference = Reference(split, tmp_path / "ref")
    rows = (2, 3)
    xs = [activations(i, r) for i, r in enumerate(rows)]
    g1 = output_grads(1, 3)
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=30_000,
                              max_devices_per_batch=2)) as live:
        sessions = [live.open_session() for _ in rows]
        concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
        _, ref_grads = reference_step(reference, union_order(live, sessions), xs, [None, g1], counted=1)
        wrong_rows = {"m": output_grads(0, 4)}  # the forward had 2 rows
        refused, accepted = concurrently(live, sessions, "backward", 0, [wrong_rows, {"m": g1}])
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "bad_tensor"
        np.testing.assert_array_equal(decoded(accepted, "h"), ref_grads[1])
        for got, expected in zip(model_weights(live), reference.weights()):
            np.testing.assert_array_equal(got, expected)
        sid, token = sessions[0]
        assert live.get(f"/v1/sessions/{sid}", token=token).json()["pending_step"] is None
        resent = concurrently(live, sessions[:1], "backward", 0, [{"m": output_grads(0, 2)}])[0]
        assert resent.json()["error"]["code"] == "step_expired"
        assert (detail(live)["applied_steps"], detail(live)["updates"]) == (1, 1)


@pytest.mark.parametrize("checkpoint_between", [False, True], ids=["log_only", "checkpoint_mid_group"])
def test_a_crash_in_the_middle_of_a_group_redoes_the_same_group(split: Path, tmp_path: Path,
                                                                checkpoint_between: bool) -> None:
    reference = Reference(split, tmp_path / "ref")
    xs = [activations(i, r) for i, r in enumerate(ROWS)]
    gs: list[np.ndarray | None] = [output_grads(i, r) for i, r in enumerate(ROWS)]
    folder = copy_split(split, tmp_path / "s")
    settings = settings_for(folder, batch_window_ms=30_000, max_devices_per_batch=3)
    live = LiveApp(settings)
    sessions = [live.open_session() for _ in ROWS]
    forwards = concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
    ref_out, ref_grads = reference_step(reference, union_order(live, sessions), xs, gs, counted=3)
    if checkpoint_between:
        live.on_writer(live.service.save_checkpoint)
    live.close(graceful=False)  # a crash: no checkpoint at exit
    with LiveApp(settings) as restarted:
        assert restarted.service.replayed >= 1 and detail(restarted)["micro_batching"]["open_groups"] == 1
        again = concurrently(restarted, sessions, "forward", 0, [{"h": x} for x in xs])  # retries
        assert [r.content for r in again] == [r.content for r in forwards]
        backwards = concurrently(restarted, sessions, "backward", 0, [{"m": g} for g in gs])
        for response, expected in zip(backwards, ref_grads):
            np.testing.assert_array_equal(decoded(response, "h"), expected)
        for got, expected in zip(model_weights(restarted), reference.weights()):
            np.testing.assert_array_equal(got, expected)
        assert detail(restarted)["applied_steps"] == 3
    for response, expected in zip(forwards, ref_out):
        np.testing.assert_array_equal(decoded(response, "m"), expected)


# ------------------------------------------------------------------------------------ real server
def test_four_devices_against_a_real_micro_batched_server(split: Path, tmp_path: Path) -> None:
    """4 device threads, one `httpx.Client` each, against `splitkeras serve --batch-window-ms`:
    one group, one update, and answers bit for bit those of the union in some arrival order."""
    import itertools
    import threading

    import httpx
    from live_server import KEY as SERVER_KEY
    from live_server import Server

    rows = (2, 1, 3, 2)
    xs = [activations(i, r) for i, r in enumerate(rows)]
    gs = [output_grads(i, r) for i, r in enumerate(rows)]
    server = Server(copy_split(split, tmp_path / "s"), checkpoint_every=1000,
                    args=["--batch-window-ms", "20000", "--max-devices-per-batch", "4", "--max-batch", "8"])
    server.start()
    answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    try:
        server.wait_ready()
        opened = [httpx.post(f"{server.url}/v1/sessions", json={}, headers={"Authorization": f"Bearer {SERVER_KEY}"})
                  .json() for _ in rows]

        def device(i: int) -> None:
            headers = {**tensor_headers(opened[i]["token"]), STEP_HEADER: "0"}
            with httpx.Client(base_url=f"{server.url}/v1/sessions/{opened[i]['session_id']}", timeout=60) as client:
                out = client.post("/forward", content=wire.encode({"h": xs[i]}), headers=headers)
                grad = client.post("/backward", content=wire.encode({"m": gs[i]}), headers=headers)
            answers[i] = (decoded(out, "m"), decoded(grad, "h"))

        threads = [threading.Thread(target=device, args=(i,)) for i in range(len(rows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        state = httpx.get(f"{server.url}/readyz?detail=1", headers={"Authorization": f"Bearer {SERVER_KEY}"}).json()
    finally:
        server.stop()
    assert sorted(answers) == [0, 1, 2, 3]
    assert (state["applied_steps"], state["updates"], state["micro_batching"]["applied_groups"]) == (4, 1, 1)
    matched = []
    for order in itertools.permutations(range(len(rows))):  # the server's union is in arrival order
        reference = Reference(split, tmp_path / f"ref{''.join(map(str, order))}")
        outputs, grads = reference_step(reference, list(order), xs, list(gs), counted=4)
        if all(np.array_equal(answers[i][0], outputs[i]) and np.array_equal(answers[i][1], grads[i])
               for i in range(len(rows))):
            matched.append(order)
            break
    assert matched, "no arrival order of the 4 devices gives the server's answers"


# ------------------------------------------------------------------------------------ the command line
def test_serve_flags_refuse_bad_values_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    for flags, message in ((["--batch-window-ms", "-1"], "--batch-window-ms"),
                           (["--max-devices-per-batch", "0"], "--max-devices-per-batch"),
                           (["--batch-backward-timeout", "0"], "--batch-backward-timeout")):
        assert main(["serve", str(tmp_path), *flags]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_micro_batching_refuses_a_split_with_the_labels_on_the_server(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    folder = make_split(tmp_path / "labels", "labels_on_server")
    assert main(["serve", str(folder), "--port", "0", "--batch-window-ms", "20"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels_on_server" in err and "--batch-window-ms" in err, err


def test_a_checkpoint_the_group_update_triggers_leaves_no_open_group(split: Path, tmp_path: Path) -> None:
    xs = [activations(i, r) for i, r in enumerate(ROWS)]
    settings = settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=30_000, max_devices_per_batch=3,
                            checkpoint_every=1)
    with LiveApp(settings) as live:
        sessions = [live.open_session() for _ in ROWS]
        concurrently(live, sessions, "forward", 0, [{"h": x} for x in xs])
        concurrently(live, sessions, "backward", 0, [{"m": output_grads(i, r)} for i, r in enumerate(ROWS)])
        assert live.service.groups.pending_records() == []
        live.close(graceful=False)
    with LiveApp(settings) as restarted:
        state = detail(restarted)
        assert (state["applied_steps"], state["micro_batching"]["open_groups"]) == (3, 0)
        for sid, token in sessions:  # the next step goes on from the checkpoint
            assert restarted.get(f"/v1/sessions/{sid}", token=token).json()["next_step"] == 1


def test_micro_batching_keeps_one_pending_step_per_session(split: Path, tmp_path: Path) -> None:
    with LiveApp(settings_for(copy_split(split, tmp_path / "s"), batch_window_ms=10, max_devices_per_batch=4,
                              max_pending_steps=4)) as live:
        opened = live.request("POST", "/v1/sessions", json={}, headers={"Authorization": f"Bearer {KEY}"}).json()
        assert opened["max_pending_steps"] == 1
        session = [(opened["session_id"], opened["token"])]
        assert concurrently(live, session, "forward", 0, [{"h": activations(0, 2)}])[0].status_code == 200
        second = concurrently(live, session, "forward", 1, [{"h": activations(1, 2)}])[0]
        assert second.status_code == 409 and second.json()["error"]["code"] == "step_out_of_order"
