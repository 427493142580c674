"""Fleet rounds in process, through ASGI (`--aggregate`, server_app/aggregation.py): the
announcement, the download, exact FedAvg and relay, quorum and deadline, every refusal of
an upload (each changes nothing), retries, and durability through a crash and a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import KEY, LiveApp, bearer, copy_split, make_split, settings_for, tensor_headers

from splitkeras import wire

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split(tmp_path_factory.mktemp("fleet") / "u", "u_shaped")


def _app(template: Path, target: Path, **overrides: Any) -> LiveApp:
    folder = target if target.exists() else copy_split(template, target)
    values: dict[str, Any] = dict(aggregate="fedavg", round_quorum=3, round_deadline_seconds=3600.0)
    values.update(overrides)
    return LiveApp(settings_for(folder, **values))


def _open(live: LiveApp) -> tuple[str, str, dict[str, Any]]:
    response = live.request("POST", "/v1/sessions", json={}, headers=bearer(KEY))
    assert response.status_code == 201, response.text
    data = response.json()
    return data["session_id"], data["token"], data


def _download(live: LiveApp, sid: str, token: str, query: str = "") -> tuple[int, dict[str, np.ndarray]]:
    response = live.get(f"/v1/sessions/{sid}/fleet/weights{query}", token)
    assert response.status_code == 200, response.text
    tensors, metadata = wire.decode(response.content)
    return int(metadata["round"]), tensors


def _upload(live: LiveApp, sid: str, token: str, round_number: int, weights: dict[str, np.ndarray],
            samples: str | None = "4", **kwargs: Any) -> Any:
    metadata = None if samples is None else {"samples": samples}
    body = wire.encode(weights, metadata=metadata)
    return live.request("POST", f"/v1/sessions/{sid}/fleet/rounds/{round_number}/weights", content=body,
                        headers={**tensor_headers(token), **kwargs.pop("headers", {})}, **kwargs)


def _moved(weights: dict[str, np.ndarray], scale: float = 0.01) -> dict[str, np.ndarray]:
    return {k: (v + scale * RNG.standard_normal(v.shape)).astype(v.dtype) for k, v in weights.items()}


def _state(live: LiveApp) -> dict[str, Any]:
    aggregator = live.service.fleet.aggregator
    return {"round": aggregator.round, "uploads": [(u.session, u.samples, u.digest) for u in aggregator.uploads],
            "norms": list(aggregator.norms), "acks": dict(aggregator.acks),
            "global": {k: v.copy() for k, v in aggregator.global_weights.items()},
            "wal": live.service.wal.last_seq}


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("round", "uploads", "norms", "acks", "wal"):
        assert before[key] == after[key], key
    assert all(np.array_equal(before["global"][k], after["global"][k]) for k in before["global"])


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


def test_announced_and_round_zero_is_the_split_folder(template: Path, tmp_path: Path) -> None:
    import splitkeras

    with _app(template, tmp_path / "a", round_steps=5) as live:
        sid, token, opened = _open(live)
        assert opened["aggregation"] == {"mode": "fedavg", "round_steps": 5, "quorum": 3,
                                         "deadline_seconds": 3600.0, "round": 0}
        round_number, weights = _download(live, sid, token)
        split = splitkeras.load_split(template)
        expected = {f"{s.name}/{v.path}": v.numpy() for s in split.segments if s.placement == "device"
                    for v in s.model.weights}
        assert round_number == 0 and sorted(weights) == sorted(expected)
        assert all(np.array_equal(weights[k], expected[k]) for k in expected)
        state = live.get(f"/v1/sessions/{sid}/fleet", token).json()
        assert state["round"] == 0 and state["uploads"] == 0
        assert live.get("/readyz", token=KEY).json()["aggregation"]["round"] == 0  # the operator's view
        assert "aggregation" not in live.get("/readyz").json()
        assert "/v1/sessions/{session_id}/fleet/rounds/{round_number}/weights" in \
            live.get("/openapi.json").json()["paths"]


def test_without_aggregation_the_routes_say_how_to_turn_it_on(template: Path, tmp_path: Path) -> None:
    with LiveApp(settings_for(copy_split(template, tmp_path / "off"))) as live:
        sid, token, opened = _open(live)
        assert opened["aggregation"] is None
        message = _error(live.get(f"/v1/sessions/{sid}/fleet/weights", token), 409, "aggregation_off")
        assert "--aggregate fedavg" in message
        _error(_upload(live, sid, token, 0, {"x": np.zeros(1, np.float32)}), 409, "aggregation_off")


def test_quorum_closes_the_round_with_the_exact_sample_weighted_average(template: Path, tmp_path: Path) -> None:
    with _app(template, tmp_path / "q") as live:
        sessions = [_open(live)[:2] for _ in range(3)]
        _, start = _download(live, *sessions[0])
        uploads = [(_moved(start), samples) for samples in (5, 7, 20)]
        for (sid, token), (weights, samples) in zip(sessions, uploads):
            answer = _upload(live, sid, token, 0, weights, str(samples))
            assert answer.status_code == 200, answer.text
        assert answer.json() == {"round": 0, "accepted": True, "uploads": 3, "closed": True, "next_round": 1}
        round_number, averaged = _download(live, *sessions[0])
        assert round_number == 1
        for name in start:
            expected = sum(np.float64(n) * w[name].astype(np.float64) for w, n in uploads) / 32.0
            assert np.array_equal(averaged[name], expected.astype(np.float32)), name
        state = live.get(f"/v1/sessions/{sessions[0][0]}/fleet", sessions[0][1]).json()
        assert state["last_round"]["samples"] == 32 and state["last_round"]["reason"] == "quorum"


def test_every_bad_upload_is_refused_and_changes_nothing(template: Path, tmp_path: Path) -> None:
    with _app(template, tmp_path / "bad") as live:
        (sid, token), (sid2, token2) = _open(live)[:2], _open(live)[:2]
        _, start = _download(live, sid, token)
        good = _moved(start)
        assert _upload(live, sid, token, 0, good).status_code == 200
        name = sorted(start)[0]
        cases = {
            "no samples": (_upload(live, sid2, token2, 0, _moved(start), None), 400, "bad_tensor"),
            "zero samples": (_upload(live, sid2, token2, 0, _moved(start), "0"), 400, "bad_tensor"),
            "samples not a number": (_upload(live, sid2, token2, 0, _moved(start), "1e3"), 400, "bad_tensor"),
            "a weight missing": (_upload(live, sid2, token2, 0, {k: v for k, v in start.items() if k != name}),
                                 400, "bad_tensor"),
            "a wrong shape": (_upload(live, sid2, token2, 0, {**start, name: np.zeros((1, 1), np.float32)}),
                              400, "bad_tensor"),
            "NaN": (_upload(live, sid2, token2, 0, {**start, name: np.full(start[name].shape, np.nan,
                                                                          np.float32)}), 400, "bad_tensor"),
            "over the weight bound": (_upload(live, sid2, token2, 0, {**start, name: start[name] + 1e7}),
                                      422, "out_of_bounds"),
            "an absurd update norm": (_upload(live, sid2, token2, 0, _moved(start, 10.0)), 422, "out_of_bounds"),
            "a closed round": (_upload(live, sid2, token2, 7, _moved(start)), 409, "round_closed"),
            "other weights again": (_upload(live, sid, token, 0, _moved(start)), 409, "already_uploaded"),
            "no token": (_upload(live, sid2, None, 0, _moved(start)), 401, "unauthorized"),
            "another media type": (_upload(live, sid2, token2, 0, _moved(start),
                                           headers={"content-type": "text/plain"}), 415,
                                   "unsupported_media_type"),
            "too large": (_upload(live, sid2, token2, 0, _moved(start),
                                  headers={"content-length": str(10**9)}), 413, "body_too_large"),
        }
        before = _state(live)
        for what, (response, status, code) in cases.items():
            assert response.status_code == status, (what, response.text)
            assert response.json()["error"]["code"] == code, what
        _assert_unchanged(before, _state(live))
        retry = _upload(live, sid, token, 0, good)  # the same bytes again: the same answer, nothing new
        assert retry.status_code == 200 and retry.json()["uploads"] == 1
        _assert_unchanged(before, _state(live))


def test_deadline_closes_a_round_with_the_uploads_that_came(template: Path, tmp_path: Path) -> None:
    with _app(template, tmp_path / "d", round_deadline_seconds=0.3) as live:
        sid, token, _ = _open(live)
        _, start = _download(live, sid, token)
        mine = _moved(start)
        assert _upload(live, sid, token, 0, mine, "9").json()["closed"] is False
        round_number, weights = _download(live, sid, token, "?after=0&wait=10")  # the long poll
        assert round_number == 1 and all(np.array_equal(weights[k], mine[k]) for k in mine)  # the mean of one
        state = live.get(f"/v1/sessions/{sid}/fleet", token).json()
        assert state["last_round"]["reason"] == "deadline"
        straggler = _open(live)[:2]
        _error(_upload(live, *straggler, 0, _moved(start)), 409, "round_closed")


def test_relay_hands_each_upload_to_the_next_device(template: Path, tmp_path: Path) -> None:
    with _app(template, tmp_path / "r", aggregate="relay") as live:
        first, second = _open(live)[:2], _open(live)[:2]
        _, start = _download(live, *first)
        mine = _moved(start)
        assert _upload(live, *first, 0, mine).json()["closed"] is True
        round_number, handed = _download(live, *second)
        assert round_number == 1 and all(np.array_equal(handed[k], mine[k]) for k in mine)


def test_uploads_survive_a_crash_and_a_restart(template: Path, tmp_path: Path) -> None:
    folder = tmp_path / "crash"
    live = _app(template, folder)
    sid, token, _ = _open(live)
    _, start = _download(live, sid, token)
    first = _moved(start)
    assert _upload(live, sid, token, 0, first, "3").status_code == 200
    before = _state(live)
    live.close(graceful=False)  # a crash: only the log holds the upload
    with _app(template, folder) as live:
        after = _state(live)
        assert after["round"] == 0 and after["uploads"] == before["uploads"]
        assert _upload(live, sid, token, 0, first, "3").json()["uploads"] == 1  # the retry is known
        sid2, token2, _ = _open(live)
        third = _open(live)[:2]
        second = _moved(start)
        _upload(live, sid2, token2, 0, second, "1")
        _upload(live, *third, 0, second, "1")
        closed = {k: v.copy() for k, v in live.service.fleet.aggregator.global_weights.items()}
    with _app(template, folder) as live:  # graceful: from fleet.npz
        assert live.service.fleet.aggregator.round == 1
        assert all(np.array_equal(closed[k], v) for k, v in live.service.fleet.aggregator.global_weights.items())
    import splitkeras  # the shutdown wrote the global device weights into the split folder: join sees them

    split = splitkeras.load_split(folder)
    joined = {f"{s.name}/{v.path}": v.numpy() for s in split.segments if s.placement == "device"
              for v in s.model.weights}
    assert all(np.array_equal(joined[k], closed[k]) for k in closed)


def test_an_upload_that_cannot_be_logged_is_not_acknowledged(template: Path, tmp_path: Path) -> None:
    with _app(template, tmp_path / "disk") as live:
        sid, token, _ = _open(live)
        _, start = _download(live, sid, token)
        wal = live.service.wal

        def full(record: Any) -> int:
            raise OSError(28, "No space left on device")

        original, wal.append = wal.append, full
        before = _state(live)
        response = _upload(live, sid, token, 0, _moved(start))
        _error(response, 503, "not_durable")
        assert response.headers["retry-after"]
        _assert_unchanged(before, _state(live))
        wal.append = original
        assert _upload(live, sid, token, 0, _moved(start)).status_code == 200  # space is back


@pytest.mark.parametrize("argv, message", [
    (["--round-steps", "3"], "error: serve: --round-steps needs --aggregate fedavg or --aggregate relay"),
    (["--aggregate", "mean"], "error: splitkeras serve: argument --aggregate: invalid choice: 'mean'"),
    (["--aggregate", "fedavg", "--round-steps", "0"], "error: splitkeras serve: argument --round-steps: "
     "expected a finite number >= 1"),
    (["--aggregate", "fedavg", "--round-quorum", "x"], "error: splitkeras serve: argument --round-quorum: "
     "expected a whole number"),
])
def test_fleet_flag_mistakes_print_one_line(argv: list[str], message: str, template: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from splitkeras.cli import main

    assert main(["serve", str(template), *argv]) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not any("Traceback" in line for line in err)


def test_a_fleet_file_of_another_mode_is_one_clear_error(template: Path, tmp_path: Path) -> None:
    from splitkeras.errors import ManifestError

    folder = tmp_path / "mode"
    with _app(template, folder):
        pass  # the graceful shutdown writes fleet.npz (fedavg)
    with pytest.raises(ManifestError, match="another aggregation mode"):
        from server_app.service import SegmentService

        SegmentService(settings_for(folder, aggregate="relay"))
