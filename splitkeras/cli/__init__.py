"""The `splitkeras` command line.

A user's mistake prints one line on stderr and exits with status 2 (usage) or 1
(a refused model, cut, file or request); never a traceback. `--format json`
gives machine-readable output where a command prints results.

One module per command, each with `register(sub)` that adds its sub-parser; this
module lists them in `COMMANDS` (the order of `splitkeras --help`). They import
downward only: `splitkeras.cli._common` (the one-line error, the parser, loading a
model) and the core, never this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitkeras.cli import demo, export, inspect, join, plan, privacy, serve, split, train
from splitkeras.cli._common import CliError, Parser, quiet_tensorflow

__all__ = ["main", "build_parser"]

COMMANDS = (split, inspect, join, serve, demo, export, plan, train, privacy)


def build_parser() -> argparse.ArgumentParser:
    from splitkeras import __version__

    parser = Parser(prog="splitkeras", description="Split learning for Keras models.")
    parser.add_argument("--version", action="version", version=f"splitkeras {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splitkeras` console script."""
    from splitkeras.errors import SplitKerasError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        before = getattr(args, "before_tensorflow", None)  # a command's environment for TensorFlow
        if before is not None:
            before()
        quiet_tensorflow()
        return int(args.func(args) or 0)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SplitKerasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
