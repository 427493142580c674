"""`splitkeras inspect MODEL`: the layers a model can be cut after, with the bytes that
would cross, and the parameters and FLOPs on each side (`splitkeras.profile`).

Example:
    $ splitkeras inspect model.keras --format json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from splitkeras.cli._common import add_unsafe, load

__all__ = ["register", "cmd_inspect"]


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from splitkeras.profile import cut_candidates

    model, source = load(args.model, args.unsafe_deserialization)
    rows = cut_candidates(model)
    if args.format == "json":
        print(json.dumps({"model": model.name, "source": source,
                          "cuts": [r.to_json() for r in rows]}, indent=2))
        return 0
    header = (f"{'layer':<28} {'class':<20} {'output shape':<22} {'bytes/sample':>12} "
              f"{'head params':>12} {'tail params':>12} {'head FLOPs':>10} {'tail FLOPs':>10}")
    print(f"Model '{model.name}': {len(rows)} layers can be a cut "
          "(bytes: float32, all tensors crossing; FLOPs: forward, per sample)")
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = ",".join("(" + ", ".join("?" if d is None else str(d) for d in s[1:]) + ")"
                         for s in r.output_shapes)
        name = r.layer if len(r.crossing) == 1 else f"{r.layer} (+{len(r.crossing) - 1})"
        print(f"{name:<28.28} {r.class_name:<20.20} {shape:<22.22} {r.bytes_per_sample:>12,} "
              f"{r.head_parameters:>12,} {r.tail_parameters:>12,} {_human(r.head_flops):>10} "
              f"{_human(r.tail_flops):>10}")
    return 0


def register(sub: Any) -> None:
    """Add the `inspect` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("inspect", help="list the cut points with bytes, parameters and FLOPs")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("--format", choices=["table", "json"], default="table")
    add_unsafe(p)
    p.set_defaults(func=cmd_inspect)
