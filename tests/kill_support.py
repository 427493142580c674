"""Kill -9 chaos against a real `splitkeras serve`: a device trains while another thread
kills the server at random moments and restarts it; the result is compared with an
uninterrupted in-process run from the same weights and batches.

Used by `tests/test_chaos_kill.py` (a short form, in the default suite) and
`benchmarks/chaos_kill.py` (the long form, results in benchmarks/results/).
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from client_support import make_split_folder
from live_server import KEY, Server

import splitkeras

__all__ = ["ChaosResult", "kill_chaos"]


@dataclass
class ChaosResult:
    kills: int
    steps_sent: int
    steps_acknowledged: int
    steps_applied: int
    lost: int
    doubled: int
    max_weight_diff: float
    resumed_from: list[int]
    replayed: list[int]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weights(model: Any) -> dict[str, np.ndarray]:
    return {w.path: np.asarray(w) for w in model.weights}


def kill_chaos(root: Path, *, kills: int, epochs: int, checkpoint_every: int, seed: int = 0,
               samples: int = 64, batch_size: int = 4) -> ChaosResult:
    """Train `epochs` over `samples` (U-shaped split, batch `batch_size`) while the server is
    killed `kills` times at random moments; compare with the same training in process."""
    from splitkeras.client import DeviceClient, Transport

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 6)).astype("float32")
    y = rng.integers(0, 3, samples).astype("int64")
    template = make_split_folder(root / "template", "u_shaped")
    folder = Path(shutil.copytree(template, root / "served"))
    server = Server(folder, checkpoint_every, name="chaos").start()
    resumed, replayed = [], []
    stop = threading.Event()
    done_kills = [0]
    chooser = random.Random(seed)

    def killer() -> None:
        server.wait_ready()
        while done_kills[0] < kills and not stop.is_set():
            # after 1-3 more acknowledged steps, at a random moment inside the next ones
            target = client.stats.steps + chooser.randint(1, 3)
            while client.stats.steps < target:
                if stop.wait(0.005):
                    return
            if stop.wait(chooser.uniform(0.0, 0.03)):
                return
            server.stop(signal.SIGKILL)
            done_kills[0] += 1
            server.start()
            state = server.wait_ready()
            resumed.append(int(state.get("resumed_from") or 0))
            replayed.append(int(state.get("replayed") or 0))

    started = time.perf_counter()
    try:
        transport = Transport(server.url, key=KEY, retries=400, backoff=0.05, max_backoff=0.5)
        client = DeviceClient(folder, server.url, transport=transport)
        client.compile()
        server.wait_ready()
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        kwargs = dict(batch_size=batch_size, shuffle=False, verbose=0)
        run = 0  # epochs trained: at least `epochs`, more while kills are still to come
        while run < epochs or (done_kills[0] < kills and thread.is_alive()):
            client.fit(x, y, epochs=1, **kwargs)
            run += 1
        stop.set()
        thread.join(120)
        sent = client.stats.steps
        client.save()
        client.close()
        applied = int(server.wait_ready()["applied_steps"])
        server.stop(signal.SIGTERM)  # writes the trained server segment back
        reference = splitkeras.load_split(template)
        for _ in range(run):
            reference.fit(x, y, epochs=1, **kwargs)
        joined = splitkeras.load_split(folder).join()
        expected = _weights(reference.join())
        diff = max(float(np.max(np.abs(expected[k] - v))) for k, v in _weights(joined).items())
    finally:
        stop.set()
        server.stop(signal.SIGKILL)
    return ChaosResult(kills=done_kills[0], steps_sent=sent, steps_acknowledged=sent,
                       steps_applied=applied, lost=max(0, sent - applied), doubled=max(0, applied - sent),
                       max_weight_diff=diff, resumed_from=resumed, replayed=replayed,
                       seconds=time.perf_counter() - started)
