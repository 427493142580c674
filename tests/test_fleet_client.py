"""The Python device client in fleet rounds (splitkeras/client/rounds.py) against the app under a
real uvicorn in this process (`ThreadedServer`): a late device starts from the latest global
weights, a straggler's upload for a closed round is dropped and it takes the latest weights,
relay hands the segments on, and `fit(rounds=...)` opts in or out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_fixtures import KEY, ThreadedServer, copy_split, make_split, settings_for

from splitkeras.errors import TrainingError

RNG = np.random.default_rng(4)
X, Y = RNG.standard_normal((8, 4)).astype("float32"), RNG.integers(0, 2, 8)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split(tmp_path_factory.mktemp("fleet-client") / "u", "u_shaped")


def _client(server: ThreadedServer, folder: Path) -> Any:
    from splitkeras.client import DeviceClient, Transport

    client = DeviceClient(folder, server.url, transport=Transport(server.url, key=KEY))
    client.compile()
    return client


def _weights(client: Any) -> dict[str, np.ndarray]:
    return {f"{s.name}/{v.path}": v.numpy() for s in client.split.segments if s.placement == "device"
            for v in s.model.weights}


def _global(server: ThreadedServer) -> dict[str, np.ndarray]:
    return server.on_writer(lambda: dict(server.service.fleet.aggregator.global_weights))


def test_late_device_starts_from_the_latest_and_a_straggler_is_dropped(template: Path, tmp_path: Path) -> None:
    folder = copy_split(template, tmp_path / "s")
    settings = settings_for(folder, aggregate="fedavg", round_quorum=2, round_deadline_seconds=0.5,
                            round_steps=2)
    with ThreadedServer(settings) as server:
        first, straggler = _client(server, folder), _client(server, folder)
        try:
            late_rounds = straggler.fleet_rounds()
            assert late_rounds is not None
            late_rounds.begin()  # holds round 0
            first.fit(X, Y, batch_size=4, verbose=0, shuffle=False)  # two steps: uploads, the deadline closes
            assert first.rounds is not None and first.rounds.round == 1
            after_first = _global(server)
            assert all(np.array_equal(after_first[k], v) for k, v in _weights(first).items())
            late_rounds.steps, late_rounds.samples = 2, 8  # it trained round 0 too, but too late
            late_rounds.sync()
            assert late_rounds.stats.dropped_uploads == 1 and late_rounds.round == 1
            assert all(np.array_equal(after_first[k], v) for k, v in _weights(straggler).items())
            third = _client(server, folder)  # joins late: fit starts from the latest global weights
            third.fit(X[:2], Y[:2], batch_size=2, epochs=0, verbose=0)
            assert all(np.array_equal(after_first[k], v) for k, v in _weights(third).items())
            third.close()
        finally:
            first.close(), straggler.close()


def test_relay_hands_the_segments_to_the_next_device(template: Path, tmp_path: Path) -> None:
    folder = copy_split(template, tmp_path / "r")
    with ThreadedServer(settings_for(folder, aggregate="relay")) as server:
        first, second = _client(server, folder), _client(server, folder)
        try:
            first.fit(X, Y, batch_size=4, verbose=0)  # per-epoch rounds: one upload, the next global
            handed = _weights(first)
            second.fit(X, Y, batch_size=4, epochs=0, verbose=0)
            assert all(np.array_equal(handed[k], v) for k, v in _weights(second).items())
            assert first.rounds is not None and first.rounds.round == 1
            session = server.service.sessions.get(first.transport.session["session_id"])
            server.on_writer(server.service.close_session, session)  # e.g. closed as idle
            first.fit(X, Y, batch_size=4, verbose=0)  # opens a new session and goes on
            assert first.rounds.round == 2 and first.transport.stats.recoveries >= 1
            assert first.transport.session["session_id"] != session.session_id
        finally:
            first.close(), second.close()


def test_fit_rounds_opt_in_and_out(template: Path, tmp_path: Path) -> None:
    plain = copy_split(template, tmp_path / "plain")
    with ThreadedServer(settings_for(plain)) as server:
        client = _client(server, plain)
        with pytest.raises(TrainingError, match="--aggregate fedavg"):
            client.fit(X, Y, batch_size=4, verbose=0, rounds=True)
        client.close()
    folder = copy_split(template, tmp_path / "out")
    with ThreadedServer(settings_for(folder, aggregate="fedavg", round_quorum=1)) as server:
        client = _client(server, folder)
        start = _global(server)
        client.fit(X, Y, batch_size=4, verbose=0, rounds=False)  # keeps its own: nothing uploaded
        assert client.rounds is None
        assert server.on_writer(lambda: server.service.fleet.aggregator.round) == 0
        assert all(np.array_equal(start[k], v) for k, v in _global(server).items())
        assert not all(np.array_equal(start[k], v) for k, v in _weights(client).items())
        client.close()
