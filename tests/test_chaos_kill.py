"""Kill -9 chaos, short form (the long form: `benchmarks/chaos_kill.py`): a real server is
killed at random moments while a device trains, and restarted; no acknowledged step is lost
or applied twice, and training ends bitwise where uninterrupted training ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from kill_support import kill_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(600)]


@pytest.mark.parametrize("checkpoint_every", [1, 5])
def test_kill_9_loses_and_doubles_nothing(tmp_path: Path, checkpoint_every: int) -> None:
    result = kill_chaos(tmp_path, kills=4, epochs=2, checkpoint_every=checkpoint_every,
                        seed=checkpoint_every)
    print(f"\nkill -9 chaos (checkpoint every {checkpoint_every}): {result.as_dict()}")
    assert result.kills == 4
    assert result.lost == 0 and result.doubled == 0
    assert result.steps_applied == result.steps_sent >= 32
    assert result.max_weight_diff <= 1e-5
    if checkpoint_every > 1:  # some restarts had steps to redo from the log
        assert any(result.replayed)
