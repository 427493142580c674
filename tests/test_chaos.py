"""The chaos battery, short form (seconds); `benchmarks/chaos.py` runs the long form and
writes benchmarks/results/chaos_guards.md. The cases are in `tests/chaos_support.py`.

* every poison is refused with the model unchanged, and the honest device trains on;
* 200 abandoned sessions with pending batch-64 forwards are closed by the idle sweep and
  their memory is freed (RSS back within 10 % of before);
* devices in threads over a real socket, a quarter of the answers lost: every step applied
  once, no 5xx.

`SPLITKERAS_CHAOS=long` runs the long sizes here too (64 devices x 50 steps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from chaos_support import abandoned_sessions, many_devices, poison_battery, predictions, process_rss
from live_server import KEY as LIVE_KEY
from live_server import Server
from server_fixtures import KEY, ThreadedServer, assert_same_state, make_split, settings_for
from server_fixtures import snapshot as full_snapshot

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

LONG = os.environ.get("SPLITKERAS_CHAOS") == "long"
DEVICES, STEPS = (64, 50) if LONG else (8, 6)
SESSIONS = 1000 if LONG else 200


def _same_everything(before: Any, after: Any) -> bool:
    try:
        assert before[0] == after[0]  # the probe's predictions, byte for byte
        assert_same_state(before[1], after[1])  # every variable, the counters, the sessions' steps
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("mode", ["u_shaped", "labels_on_server"])
def test_every_poison_is_refused_and_changes_nothing(mode: str, tmp_path: Path) -> None:
    folder = make_split(tmp_path / mode, mode)
    with ThreadedServer(settings_for(folder)) as server, httpx.Client(base_url=server.url) as client:
        probe = predictions(client, KEY)

        def state() -> Any:
            return probe(), server.on_writer(full_snapshot, server.service)

        results, carried_on = poison_battery(client, KEY, state, _same_everything)
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    assert len(results) >= 6 and carried_on
    for result in results:
        assert result.code == ("bad_tensor" if result.expected == 400 else "out_of_bounds"), result


def test_abandoned_sessions_are_closed_and_their_memory_freed(tmp_path: Path) -> None:
    """A real `splitkeras serve` (its allocator settings included), --session-ttl 6."""
    folder = make_split(tmp_path / "wide", "u_shaped", width=1024)
    server = Server(folder, 1000, ["--max-batch", "64", "--session-ttl", "6"]).start()
    try:
        server.wait_ready()
        assert server.process is not None
        with httpx.Client(base_url=server.url, timeout=60) as client:
            figures = abandoned_sessions(client, LIVE_KEY, process_rss(server.process.pid), sessions=SESSIONS,
                                         batch=64)
    finally:
        server.stop()
    print(f"\nabandoned sessions: {figures}")
    assert figures["sessions_left"] == 0
    grew = figures["rss_with_sessions_mib"] - figures["rss_before_mib"]
    assert grew > 0.2 * figures["rss_before_mib"], figures  # the case is big enough to see
    assert figures["rss_after_mib"] <= 1.10 * figures["rss_before_mib"], figures


def test_many_devices_with_lost_answers_apply_every_step_once(tmp_path: Path) -> None:
    folder = make_split(tmp_path / "u", "u_shaped")
    with ThreadedServer(settings_for(folder)) as server:
        result = many_devices(server.url, KEY, lambda: server.service.applied_steps, devices=DEVICES, steps=STEPS,
                              retry_rate=0.25)
        refused = server.service.refused_steps
    print(f"\n{DEVICES} devices x {STEPS} steps: {result}")
    assert not result.failures, result.failures
    assert result.sent == DEVICES * STEPS == result.applied_by_sessions == result.applied_by_server
    assert result.server_errors == 0 and result.lost > 0 and refused == 0
