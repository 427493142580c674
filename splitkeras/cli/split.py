"""`splitkeras split MODEL --at LAYER`: cut a model file at named layers into a split folder.

Example:
    $ splitkeras split model.keras --at conv2d_3 --at dense_1 -o out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from splitkeras.cli._common import add_unsafe, load

__all__ = ["register", "cmd_split"]


def cmd_split(args: argparse.Namespace) -> int:
    import splitkeras

    model, source = load(args.model, args.unsafe_deserialization)
    placements = args.placement.split(",") if args.placement else None
    result = splitkeras.split(model, at=args.at, placements=placements, source=source)
    out = Path(args.output or f"{Path(args.model).stem}_split")
    manifest_path = result.save(out, tfjs=args.tfjs)
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"manifest": str(manifest_path), **result.manifest.to_json()}, indent=2))
        return 0
    print(f"Split '{model.name}' at {', '.join(args.at)} into {out}/")
    for segment in result.segments:
        crossing = ", ".join(s.name for s in segment.outputs)
        print(f"  {segment.name:<8} {segment.placement:<7} {segment.model.count_params():>12,} params"
              f"  -> {crossing}")
    print(f"Manifest: {manifest_path}")
    return 0


def register(sub: Any) -> None:
    """Add the `split` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("split", help="cut a model file at named layers")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("--at", action="append", required=True, metavar="LAYER",
                   help="a layer to cut after (repeat for more cuts, in data-flow order)")
    p.add_argument("-o", "--output", help="output folder (default: MODEL_split)")
    p.add_argument("--placement", help="comma-separated device/server per segment "
                   "(default: U-shaped for two cuts, head on device for one)")
    p.add_argument("--no-tfjs", dest="tfjs", action="store_false",
                   help="do not export the device segments as TF.js bundles")
    p.add_argument("--format", choices=["text", "json"], default="text")
    add_unsafe(p)
    p.set_defaults(func=cmd_split)
