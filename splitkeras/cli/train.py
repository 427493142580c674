"""`splitkeras train OUT --server URL --data FILE.npz`: train a split's device segments
against a running `splitkeras serve` server, then save them back into OUT.

Example:
    $ splitkeras serve out --port 8000 &
    $ splitkeras train out --server http://127.0.0.1:8000 --data train.npz --epochs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from splitkeras.cli._common import CliError, add_compress, add_unsafe

__all__ = ["register", "cmd_train", "load_training_data"]


def load_training_data(path: str | Path, input_names: list[str],
                       output_names: list[str]) -> tuple[Any, Any]:
    """`x` and `y` from an `.npz` file: arrays `x` and `y`, or `x_<input name>` /
    `y_<output name>` per input / output for a model with several."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CliError(f"train: data file '{path}' does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CliError(f"train: '{path}' is not a NumPy .npz file ({error})") from None
    if not hasattr(data, "files"):
        raise CliError(f"train: '{path}' holds one array; save inputs and labels together with "
                       f"np.savez('{path.name}', x=..., y=...)")
    with data:
        arrays = {name: data[name] for name in data.files}

    def pick(prefix: str, names: list[str], what: str) -> Any:
        if prefix in arrays:
            if len(names) > 1:
                raise CliError(f"train: the model has {len(names)} {what}s {names}; save one array per "
                               f"{what} named {[f'{prefix}_{n}' for n in names]} instead of '{prefix}'")
            return arrays[prefix]
        wanted = [f"{prefix}_{n}" for n in names]
        if len(names) > 1 and all(w in arrays for w in wanted):
            return [arrays[w] for w in wanted]
        held = ", ".join(sorted(arrays)) or "no arrays"
        expected = f"'{prefix}'" if len(names) == 1 else f"{wanted}"
        raise CliError(f"train: '{path}' has no array {expected} (it holds: {held}); save the "
                       f"inputs as 'x' and the labels as 'y': np.savez('{path.name}', x=..., y=...)")

    x, y = pick("x", input_names, "input"), pick("y", output_names, "output")
    lengths = {len(a) for a in (x if isinstance(x, list) else [x]) + (y if isinstance(y, list) else [y])}
    if len(lengths) != 1:
        raise CliError(f"train: the arrays in '{path}' hold different numbers of samples "
                       f"({sorted(lengths)}); x and y need one row per sample")
    return x, y


def _optimizer(args: argparse.Namespace, training: dict[str, Any] | None) -> Any:
    """None (the split's own), or the optimizer named / re-rated on the command line."""
    if args.optimizer is None and args.learning_rate is None:
        return None
    import keras

    from splitkeras.training import restore_compile_value

    if args.optimizer is not None:
        config: Any = {"class_name": args.optimizer, "config": {}}
    else:
        saved = (training or {}).get("optimizer") or "rmsprop"
        base = restore_compile_value(saved)
        config = keras.optimizers.serialize(keras.optimizers.get(base))
    if args.learning_rate is not None:
        config["config"]["learning_rate"] = args.learning_rate
    try:
        return keras.optimizers.get(config)
    except (ValueError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CliError(f"train: cannot make optimizer '{args.optimizer}' ({first}); use a Keras "
                       "optimizer name such as adam, sgd or rmsprop") from None


def _check_shapes(x: Any, specs: list[Any]) -> None:
    for value, spec in zip(x if isinstance(x, list) else [x], specs):
        sample = tuple(value.shape[1:])
        if len(sample) != len(spec.sample_shape) or any(
                d is not None and d != v for d, v in zip(spec.sample_shape, sample)):
            expected = tuple("?" if d is None else d for d in spec.sample_shape)
            raise CliError(f"train: the inputs for '{spec.name}' have samples of shape {sample}; "
                           f"the model takes {expected}")


def _defences(args: argparse.Namespace) -> list[Any]:
    """The `--defence SPEC` options as defences (`splitkeras.privacy.parse_defence`)."""
    if not args.defence:
        return []
    from splitkeras.errors import TrainingError
    from splitkeras.privacy.defences.spec import parse_defence

    try:
        return [parse_defence(spec, seed=args.defence_seed) for spec in args.defence]
    except TrainingError as error:
        raise CliError(f"train: --defence: {error}") from None


def server_urls(values: list[str]) -> str | dict[str, str]:
    """`--server URL` (one server stage), or `--server NAME=URL` once per server stage."""
    if len(values) == 1 and "=" not in values[0].split("://", 1)[0]:
        return values[0]
    urls: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url or "://" in name:
            raise CliError(f"train: --server '{value}': with several servers give each as NAME=URL "
                           "(NAME: the first segment of a server stage, e.g. middle_1=http://host:8000)")
        if name in urls:
            raise CliError(f"train: --server names '{name}' twice")
        urls[name] = url
    return urls


def cmd_train(args: argparse.Namespace) -> int:
    from splitkeras.client.device import DeviceClient, resolve_key
    from splitkeras.manifest import Manifest

    if args.epochs < 1 or args.batch_size < 1:
        raise CliError("train: --epochs and --batch-size must be at least 1")
    manifest = Manifest.read(args.split_dir)
    x, y = load_training_data(args.data, [s.name for s in manifest.model_inputs],
                              [s.name for s in manifest.model_outputs])
    _check_shapes(x, manifest.model_inputs)
    key = resolve_key(args.key, args.split_dir)
    if key is None:
        raise CliError("train: no server key; pass --key, set SPLITKERAS_SERVER_KEY, or run on the "
                       f"server's machine where {Path(args.split_dir) / '.splitkeras' / 'server.key'} "
                       "exists (written by `splitkeras serve`)")
    optimizer = _optimizer(args, manifest.training)
    defences = _defences(args)
    text = args.format == "text"
    servers = server_urls(args.server)
    with DeviceClient(args.split_dir, servers, key=key, wire_dtype=args.wire_dtype, compress=args.compress,
                      unsafe_deserialization=args.unsafe_deserialization, defences=defences) as client:
        client.compile(optimizer=optimizer)
        if text:
            where = ", ".join(t.base_url for t in client.transports.values())
            print(f"Training the device segments of '{client.split.model_name}' "
                  f"({client.mode}) against {where}, wire {args.compress or args.wire_dtype}", flush=True)
        history = client.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
                             verbose=1 if text else 0, shuffle=args.shuffle,
                             pipeline_depth=args.pipeline_depth)
        saved = client.save()
        stats = client.stats
    final = {k: v[-1] for k, v in history.history.items()}
    if not text:
        print(json.dumps({"history": history.history, "final": final, "stats": stats.as_dict(),
                          "saved": [str(p) for p in saved]}, indent=2))
        return 0
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                        if k not in ("sent_MB", "received_MB", "ms_per_sample"))
    samples = max(stats.samples, 1)
    print(f"Trained {args.epochs} epoch(s), {stats.steps} steps: {metrics}")
    print(f"Sent {stats.bytes_sent / 1e6:.3f} MB, received {stats.bytes_received / 1e6:.3f} MB "
          f"({stats.bytes_sent / samples:,.0f} / {stats.bytes_received / samples:,.0f} bytes per "
          f"sample); {1e3 * stats.transport_seconds / samples:.3f} ms per sample on the network, "
          f"{1e3 * stats.device_seconds / samples:.3f} on the device")
    print(f"Saved {', '.join(p.name for p in saved)} into {args.split_dir}/")
    return 0


def register(sub: Any) -> None:
    """Add the `train` command to the `splitkeras` sub-command parser."""
    p = sub.add_parser("train", help="train the device segments against a `splitkeras serve` server")
    p.add_argument("split_dir", help="a folder written by `splitkeras split` (the device segments)")
    p.add_argument("--server", required=True, action="append", metavar="URL",
                   help="the server, e.g. http://127.0.0.1:8000; with several server stages, "
                   "NAME=URL once per stage (NAME: its first segment, e.g. middle_1=http://...). "
                   "A chain of server segments is one stage: give its first server")
    p.add_argument("--data", required=True, metavar="FILE.npz",
                   help="arrays 'x' (inputs) and 'y' (labels); 'x_<input>' / 'y_<output>' for several")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", help="Keras optimizer for the device segments (default: the "
                   "split's; the server segment uses the server's)")
    p.add_argument("--learning-rate", type=float, help="learning rate of that optimizer")
    add_compress(p)
    p.add_argument("--key", help="server key (default: $SPLITKERAS_SERVER_KEY, else "
                   "SPLIT_DIR/.splitkeras/server.key)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep the samples in file order")
    p.add_argument("--defence", action="append", metavar="SPEC",
                   help="a privacy defence for the training steps (repeatable): max-norm[:STRENGTH], "
                   "gradient-noise:SCALE, activation-noise:CLIP,SIGMA, nopeek:ALPHA, "
                   "randomized-response:EPSILON (docs/privacy.md)")
    p.add_argument("--defence-seed", type=int, help="seed of the defences' noise (default: fresh)")
    p.add_argument("--pipeline-depth", type=int, choices=range(1, 5), default=1, metavar="N",
                   help="steps in flight at once, 1-4 (1: sequential; 2-4: the next batch's head and "
                   "server forward overlap the server's work on the current one, with staleness: "
                   "docs/training.md, Pipelining); capped by the server's --max-pending-steps")
    p.add_argument("--format", choices=["text", "json"], default="text")
    add_unsafe(p)
    p.set_defaults(func=cmd_train)
