"""Kill -9 chaos, long form: a device trains over HTTP while the server is killed with
SIGKILL at random moments (>= 20 kills, several checkpoint settings) and restarted; every
run is compared with the same training uninterrupted, in process.

    .venv/bin/python benchmarks/chaos_kill.py [--kills 20] [--epochs 6]

Writes benchmarks/results/chaos_kill.{md,json}. The short form is tests/test_chaos_kill.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import RESULTS, machine  # noqa: E402
from kill_support import kill_chaos  # noqa: E402


def main() -> None:
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as the server (TF_DETERMINISTIC_OPS=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, action="append")
    args = parser.parse_args()
    rows = []
    for every in args.checkpoint_every or [1, 5, 50]:
        with tempfile.TemporaryDirectory() as root:
            result = kill_chaos(Path(root), kills=args.kills, epochs=args.epochs, checkpoint_every=every,
                                seed=every)
        rows.append({"checkpoint_every": every, **result.as_dict()})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos_kill.json").write_text(json.dumps({"machine": machine(), "runs": rows}, indent=1))
    lines = ["# Kill -9 chaos (benchmarks/chaos_kill.py)", "",
             f"A U-shaped split trained over HTTP on 127.0.0.1 ({args.epochs}+ epochs of 64 samples, batch 4); "
             "the server is killed with SIGKILL at random moments (after 1-3 more acknowledged steps, "
             "0-30 ms into the next) and restarted, each time replaying its write-ahead log. Compared "
             "with the same training uninterrupted, in process (op determinism on both sides).", "",
             "| checkpoint every | kills | steps acknowledged | applied | lost | doubled | max abs weight diff "
             "| log records replayed per restart | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['checkpoint_every']} | {row['kills']} | {row['steps_acknowledged']} | "
                     f"{row['steps_applied']} | {row['lost']} | {row['doubled']} | {row['max_weight_diff']:.3g} | "
                     f"{', '.join(map(str, row['replayed']))} | {row['seconds']:.0f} |")
    (RESULTS / "chaos_kill.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
