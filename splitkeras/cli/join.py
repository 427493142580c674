"""`splitkeras join SPLIT_DIR`: stitch the segments of a split folder back into one model.

Example:
    $ splitkeras join out -o trained.keras
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitkeras.cli._common import CliError, add_unsafe

__all__ = ["register", "cmd_join"]


def cmd_join(args: argparse.Namespace) -> int:
    import splitkeras

    folder = Path(args.split_dir)
    out = Path(args.output or folder / "joined.keras")
    if out.suffix not in (".keras", ".h5"):
        raise CliError(f"join: output '{out}' must end in .keras or .h5")
    result = splitkeras.load_split(folder, unsafe_deserialization=args.unsafe_deserialization)
    model = result.join()
    model.save(out)
    print(f"Joined {len(result.segments)} segments of '{result.model_name}' into {out}")
    return 0


def register(sub: Any) -> None:
    """Add the `join` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("join", help="stitch the segments of a split folder back into one model")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("-o", "--output", help="model file to write (default: SPLIT_DIR/joined.keras)")
    add_unsafe(p)
    p.set_defaults(func=cmd_join)
