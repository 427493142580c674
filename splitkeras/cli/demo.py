"""`splitkeras demo`: split a digits CNN, serve it, train over HTTP, compare with central
training (`splitkeras.demo.run_demo`).

Example:
    $ splitkeras demo --epochs 2 --compress forward=int8,backward=topk:0.05+int8 --format json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from splitkeras.cli._common import CliError, add_compress

__all__ = ["register", "cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    from splitkeras.demo import run_demo

    if args.epochs < 1 or args.batch_size < 1:
        raise CliError("demo: --epochs and --batch-size must be at least 1")
    result = run_demo(args.output, epochs=args.epochs, batch_size=args.batch_size, wire_dtype=args.wire_dtype,
                      compress=args.compress, verbose=1 if args.format == "text" else 0)
    if args.format == "json":
        print(json.dumps({k: str(v) if k == "folder" else v for k, v in dataclasses.asdict(result).items()},
                         indent=1))
    return 0


def register(sub: Any) -> None:
    """Add the `demo` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("demo", help="split a digits CNN, serve it, train over HTTP, compare with central")
    p.add_argument("-o", "--output", default="splitkeras-demo", help="folder for the split (replaced)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    add_compress(p)
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="json: the table (accuracies, bytes and time per sample) as one JSON object")
    p.set_defaults(func=cmd_demo)
