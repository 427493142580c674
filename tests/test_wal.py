"""The write-ahead log: its file format, replay after a crash (bitwise), and durability
failures that are refused loudly and recovered from."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import KEY, LiveApp, bearer, copy_split, make_split, settings_for, snapshot

from server_app.wal import Record, WriteAheadLog
from splitkeras import protocol

RNG = np.random.default_rng(3)


def act(batch: int = 2, width: int = 3) -> np.ndarray:
    return RNG.standard_normal((batch, width)).astype(np.float32)


def path(sid: str, route: str) -> str:
    return protocol.step_path(sid, route)


# ---------------------------------------------------------------------------------- the file
def test_records_round_trip_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    for i in range(3):
        assert wal.append(Record("forward", {"session": "s", "step": i}, [bytes([i]) * (i + 1), b""])) == i + 1
    wal.close()
    good = (tmp_path / "wal.log").stat().st_size
    with open(tmp_path / "wal.log", "ab") as handle:  # a crash in the middle of a write
        handle.write(Record("backward", {"step": 9}, [b"x" * 50]).encode()[:30])
    again = WriteAheadLog(tmp_path)
    records = list(again.records())
    assert [(r.seq, r.kind, r.fields["step"], r.blobs) for r in records] == [
        (1, "forward", 0, [b"\x00", b""]), (2, "forward", 1, [b"\x01\x01", b""]),
        (3, "forward", 2, [b"\x02\x02\x02", b""])]
    assert (tmp_path / "wal.log").stat().st_size == good, "the torn tail is cut off"
    assert again.append(Record("close", {"session": "s"})) == 4
    assert [r.seq for r in WriteAheadLog(tmp_path).records(after=2)] == [3, 4]


def test_a_corrupt_record_ends_the_log_there(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    for i in range(3):
        wal.append(Record("forward", {"step": i}, [b"abc"]))
    wal.close()
    data = bytearray((tmp_path / "wal.log").read_bytes())
    second = len(Record("forward", {"step": 0}, [b"abc"], seq=1).encode())
    data[second + 12] ^= 0xFF  # a flipped byte inside the second record
    (tmp_path / "wal.log").write_bytes(bytes(data))
    assert [r.fields["step"] for r in WriteAheadLog(tmp_path).records()] == [0]


def test_reset_empties_the_log_and_numbers_go_on(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(Record("open", {"session": "a"}))
    wal.append(Record("open", {"session": "b"}))
    wal.reset()
    assert (tmp_path / "wal.log").stat().st_size == 0
    assert wal.append(Record("close", {"session": "a"})) == 3


# ---------------------------------------------------------------------------------- replay
@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wal")
    return {mode: make_split(root / mode, mode) for mode in ("u_shaped", "labels_on_server")}


def _interleaved_steps(live: LiveApp) -> dict[str, Any]:
    """Two devices, interleaved; device A ends with a forward still pending."""
    a, token_a = live.open_session()
    b, token_b = live.open_session()
    answers = {}
    for k in range(3):
        for sid, token in ((a, token_a), (b, token_b)):
            assert live.post(path(sid, "forward"), step=k, tensors={"h": act()}, token=token).status_code == 200
            response = live.post(path(sid, "backward"), step=k, tensors={"m": act()}, token=token)
            assert response.status_code == 200
            answers[sid] = (k, response.content)
    pending = live.post(path(a, "forward"), step=3, tensors={"h": act()}, token=token_a)
    assert pending.status_code == 200
    closed, token_c = live.open_session()
    assert live.request("DELETE", f"/v1/sessions/{closed}", headers=bearer(token_c)).status_code == 204
    return {"a": (a, token_a), "b": (b, token_b), "answers": answers, "pending": pending.content,
            "closed": closed}


def test_a_crash_replays_every_acknowledged_change_bitwise(templates: dict[str, Path], tmp_path: Path) -> None:
    """No checkpoint after the start: everything comes back from the log, bitwise (weights,
    BatchNorm statistics, optimizer state, sessions, the pending forward's tape), and retries
    after the restart get the same bytes."""
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    live = LiveApp(settings_for(folder, checkpoint_every=10_000))
    try:
        story = _interleaved_steps(live)
        before = snapshot(live.service)
        scales = live.service.guard.state()
        assert live.service.wal.appended == 17  # 3 opens, 1 close, 7 forwards, 6 backwards
    finally:
        live.close(graceful=False)  # a crash: no shutdown checkpoint
    with LiveApp(settings_for(folder)) as again:
        after = snapshot(again.service)
        assert scales and again.service.guard.state() == scales  # the guard's running scales too
        for key in ("iterations", "applied_steps", "sessions", "pending"):
            assert after[key] == before[key], key
        for key in ("model", "optimizer"):
            assert all(np.array_equal(x, y) for x, y in zip(before[key], after[key])), key
        assert again.get("/readyz", token=KEY).json()["replayed"] == 17
        (a, token_a), (b, token_b) = story["a"], story["b"]
        step, answer = story["answers"][b]
        retry = again.post(path(b, "backward"), step=step, tensors={"m": act()}, token=token_b)
        assert retry.status_code == 200 and retry.content == answer, "a retry gets the same bytes"
        resent = again.post(path(a, "forward"), step=3, tensors={"h": act()}, token=token_a)
        assert resent.content == story["pending"]  # the pending forward survived: no forward_lost
        assert again.post(path(a, "backward"), step=3, tensors={"m": act()}, token=token_a).status_code == 200
        assert again.service.applied_steps == 7
        assert again.get(f"/v1/sessions/{story['closed']}", token=KEY).status_code == 404
        assert (again.service.checkpoint_dir / "wal.log").stat().st_size > 0  # the new step is logged


def test_the_guards_running_scales_survive_a_restart(templates: dict[str, Path], tmp_path: Path) -> None:
    """From the checkpoint (a clean stop), and from a checkpoint plus the log after it: the
    relative bounds go on from where they were, bitwise, instead of warming up again."""
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    with LiveApp(settings_for(folder, checkpoint_every=4)) as live:
        _interleaved_steps(live)  # 6 applied steps: a checkpoint after 4, the log after it
        scales = live.service.guard.state()
        accepted = {key: count for key, (_, count) in scales.items()}
    assert accepted and all(count >= 6 for count in accepted.values()), accepted
    with LiveApp(settings_for(folder)) as again:
        assert again.service.guard.state() == scales
    state = json.loads((folder / "ck" / "state.json").read_text())
    assert state["guard"] == scales  # the clean stop's checkpoint holds them


def test_labels_on_server_steps_replay_bitwise(templates: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_split(templates["labels_on_server"], tmp_path / "l")
    live = LiveApp(settings_for(folder, checkpoint_every=10_000))
    try:
        sid, token = live.open_session()
        answers = []
        for k in range(3):
            body = {"h": act(), "label:logits": np.array([0, 1])}
            response = live.post(path(sid, "train"), step=k, tensors=body, token=token)
            assert response.status_code == 200, response.text
            answers.append(response.content)
        before = snapshot(live.service)
    finally:
        live.close(graceful=False)
    with LiveApp(settings_for(folder)) as again:
        after = snapshot(again.service)
        assert after["iterations"] == before["iterations"] == 3
        for key in ("model", "optimizer"):
            assert all(np.array_equal(x, y) for x, y in zip(before[key], after[key])), key
        retry = again.post(path(sid, "train"), step=2, tensors={"h": act(), "label:logits": np.array([0, 1])},
                           token=token)
        assert retry.content == answers[2]


# ---------------------------------------------------------------------------------- durability
def _failing(service: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The disk refuses the log and the checkpoint (ENOSPC) until the returned function is called."""
    real_append, real_save = service.wal.append, service.host.save_checkpoint

    def full(*_: Any, **__: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(service.wal, "append", full)
    monkeypatch.setattr(service.host, "save_checkpoint", full)

    def restore() -> None:
        monkeypatch.setattr(service.wal, "append", real_append)
        monkeypatch.setattr(service.host, "save_checkpoint", real_save)

    return restore


def test_a_failed_log_write_is_refused_loudly_and_recovers(templates: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    with LiveApp(settings_for(folder, checkpoint_every=10_000)) as live:
        sid, token = live.open_session()
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200
        restore = _failing(live.service, monkeypatch)
        grads = act()
        refused = live.post(path(sid, "backward"), step=0, tensors={"m": grads}, token=token)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_durable"
        assert refused.headers["retry-after"] == "2"
        assert "No space left on device" in refused.json()["error"]["message"]
        assert live.get("/readyz").status_code == 503
        assert live.get("/readyz", token=KEY).json()["status"] == "not_durable"
        # while the disk refuses, nothing is acknowledged, not even the cached answer
        assert live.post(path(sid, "backward"), step=0, tensors={"m": grads}, token=token).status_code == 503
        restore()
        retry = live.post(path(sid, "backward"), step=0, tensors={"m": grads}, token=token)
        assert retry.status_code == 200  # a checkpoint made it durable; the update counted once
        assert live.service.applied_steps == 1 and live.get("/readyz").status_code == 200
        assert live.post(path(sid, "forward"), step=1, tensors={"h": act()}, token=token).status_code == 200
        _failing(live.service, monkeypatch)
        refused = live.post(path(sid, "backward"), step=1, tensors={"m": act()}, token=token)
        assert refused.status_code == 503
        monkeypatch.undo()


def test_a_forward_that_cannot_be_logged_leaves_nothing_pending(templates: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    with LiveApp(settings_for(folder, checkpoint_every=10_000)) as live:
        sid, token = live.open_session()
        restore = _failing(live.service, monkeypatch)
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 503
        assert live.service.runner._pending == {}
        assert live.get(f"/v1/sessions/{sid}", token=token).json()["pending_step"] is None
        restore()
        assert live.post(path(sid, "forward"), step=0, tensors={"h": act()}, token=token).status_code == 200


def test_temporary_files_of_a_killed_write_are_removed_at_start(templates: dict[str, Path],
                                                                tmp_path: Path) -> None:
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    with LiveApp(settings_for(folder)) as live:
        checkpoints = live.service.checkpoint_dir
    (checkpoints / ".arrays.npz.k3j2.tmp").write_bytes(b"half a checkpoint")
    (folder / ".middle.saving.keras").write_bytes(b"half a segment")
    with LiveApp(settings_for(folder)):
        assert not list(checkpoints.glob(".*.tmp")) and not (folder / ".middle.saving.keras").exists()
        assert (checkpoints / "arrays.npz").exists() or list(checkpoints.iterdir())


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 512 KiB tmpfs (needs root and a kernel that lets the sandbox mount one)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): the "
                    "disk-full case is covered by the simulated ENOSPC tests above")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_refused_loudly_and_training_carries_on_when_space_is_back(
        templates: dict[str, Path], tmp_path: Path, small_disk: Path) -> None:
    folder = copy_split(templates["u_shaped"], tmp_path / "u")
    with LiveApp(settings_for(folder, checkpoint_dir=small_disk / "ck", checkpoint_every=3)) as live:
        sid, token = live.open_session()
        for k in range(2):
            assert live.post(path(sid, "forward"), step=k, tensors={"h": act()}, token=token).status_code == 200
            assert live.post(path(sid, "backward"), step=k, tensors={"m": act()}, token=token).status_code == 200
        filler = small_disk / "filler"
        with open(filler, "wb", buffering=0) as handle:  # fill the disk to the last byte
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
            try:
                while True:
                    handle.write(b"\0")
            except OSError:
                pass
        step, refused = 2, None
        while step < 200:  # the log's last page may still hold a few records: go on until it is full
            x, grads = act(), act()
            answer = live.post(path(sid, "forward"), step=step, tensors={"h": x}, token=token)
            if answer.status_code == 200:
                answer = live.post(path(sid, "backward"), step=step, tensors={"m": grads}, token=token)
            if answer.status_code != 200:
                refused = answer
                break
            step += 1
        assert refused is not None and refused.status_code == 503, "the full disk was never noticed"
        assert refused.json()["error"]["code"] == "not_durable" and refused.headers["retry-after"] == "2"
        assert live.get("/readyz").status_code == 503
        applied = live.service.applied_steps
        filler.unlink()  # space is back: the next request makes everything durable again
        route = "backward" if live.get(f"/v1/sessions/{sid}", token=token).json()["pending_step"] == step \
            else "forward"
        if route == "forward":
            assert live.post(path(sid, "forward"), step=step, tensors={"h": x}, token=token).status_code == 200
        assert live.post(path(sid, "backward"), step=step, tensors={"m": grads}, token=token).status_code == 200
        assert live.get("/readyz").status_code == 200
        assert live.service.applied_steps in (applied, applied + 1) and live.service.applied_steps == step + 1
        assert not list((small_disk / "ck").glob(".*.tmp")), "no temporary file is left behind"
