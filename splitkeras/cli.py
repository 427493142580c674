"""The `splitkeras` command line.

A user's mistake prints one line on stderr and exits with status 2 (usage) or 1
(a refused model, cut, file or request); never a traceback. `--format json`
gives machine-readable output where a command prints results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        raise CliError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up chatter (CUDA probes, oneDNN notes) muted.

    Those lines are written to file descriptor 2 before any Python logging is set up,
    so fd 2 points at /dev/null while TensorFlow is imported, then comes back.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # probes CUDA now, while muted
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)


def _load(path: str, unsafe: bool) -> Any:
    from converters.keras_io import file_sha256, load_model

    model = load_model(path, unsafe_deserialization=unsafe)
    return model, {"file": Path(path).name, "sha256": file_sha256(path)}


# ---- split ---------------------------------------------------------------------------------------
def cmd_split(args: argparse.Namespace) -> int:
    import splitkeras

    model, source = _load(args.model, args.unsafe_deserialization)
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


# ---- inspect -------------------------------------------------------------------------------------
def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def cmd_inspect(args: argparse.Namespace) -> int:
    from splitkeras.profile import cut_candidates

    model, source = _load(args.model, args.unsafe_deserialization)
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


# ---- join ----------------------------------------------------------------------------------------
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


# ---- serve ---------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server_app import ServerSettings, create_app  # the server is optional for the core

    overrides = {k: v for k, v in {
        "key": args.key, "checkpoint_every": args.checkpoint_every,
        "step_ttl_seconds": args.step_ttl, "max_batch": args.max_batch,
    }.items() if v is not None}
    settings = ServerSettings(split_dir=Path(args.split_dir),
                              unsafe_deserialization=args.unsafe_deserialization, **overrides)
    from splitkeras.manifest import Manifest

    Manifest.read(settings.split_dir)  # a wrong folder fails here, in one line
    where = "SPLITKERAS_SERVER_KEY" if settings.key else settings.key_file
    print(f"splitkeras server for {settings.split_dir} on http://{args.host}:{args.port} "
          f"(docs: /docs; key: {where})", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ---- demo ----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from splitkeras.demo import run_demo

    if args.epochs < 1 or args.batch_size < 1:
        raise CliError("demo: --epochs and --batch-size must be at least 1")
    run_demo(args.output, epochs=args.epochs, batch_size=args.batch_size, wire_dtype=args.wire_dtype)
    return 0


# ---- parser --------------------------------------------------------------------------------------
def _add_unsafe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unsafe-deserialization", action="store_true",
                        help="allow Lambda layers (they run arbitrary code; only for files you trust)")


def build_parser() -> argparse.ArgumentParser:
    from splitkeras import __version__

    parser = _Parser(prog="splitkeras", description="Split learning for Keras models.")
    parser.add_argument("--version", action="version", version=f"splitkeras {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

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
    _add_unsafe(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("inspect", help="list the cut points with bytes, parameters and FLOPs")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("--format", choices=["table", "json"], default="table")
    _add_unsafe(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("join", help="stitch the segments of a split folder back into one model")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("-o", "--output", help="model file to write (default: SPLIT_DIR/joined.keras)")
    _add_unsafe(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("serve", help="serve and train the server segment of a split over HTTP")
    p.add_argument("split_dir", help="a folder written by `splitkeras split`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--key", help="session key (default: $SPLITKERAS_SERVER_KEY, else generated "
                   "into SPLIT_DIR/.splitkeras/server.key)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N applied steps (100)")
    p.add_argument("--step-ttl", type=float, help="seconds an unfinished step is kept (300)")
    p.add_argument("--max-batch", type=int, help="largest batch per request (256)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    _add_unsafe(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="split a digits CNN, serve it, train over HTTP, compare with central")
    p.add_argument("-o", "--output", default="splitkeras-demo", help="folder for the split (replaced)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32")
    p.set_defaults(func=cmd_demo)

    from splitkeras import (
        cli_export,  # noqa: F401  (appends the `export` command to _EXTRA_COMMANDS)
        cli_plan,  # noqa: F401  (appends the `plan` command to _EXTRA_COMMANDS)
        cli_train,  # noqa: F401  (appends the `train` command to _EXTRA_COMMANDS)
    )
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splitkeras` console script."""
    from splitkeras.errors import SplitKerasError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _quiet_tensorflow()
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


if __name__ == "__main__":
    # Run the `splitkeras.cli` module object, not this `__main__` copy: the extra command
    # modules register on `splitkeras.cli._EXTRA_COMMANDS`.
    from splitkeras.cli import main as _main

    sys.exit(_main())
