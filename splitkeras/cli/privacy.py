"""`splitkeras privacy`: measure what an honest-but-curious server learns, in process.

* `splitkeras privacy audit OUT --data train.npz --test test.npz [--aux aux.npz]
  [--defence SPEC ...]`: train the split of OUT in process with the device's defences on,
  record what its server stage receives, attack it (label inference from the gradients;
  input reconstruction with a decoder trained on the `--aux` inputs) and print the figures
  next to the test accuracy.
* `splitkeras privacy epsilon --sigma S --epochs E [--delta D]`: the DP epsilon of
  `ActivationNoise` (see docs/privacy.md for the mechanism).

Example:
    $ splitkeras privacy audit out --data train.npz --test test.npz --defence max-norm --epochs 10
    $ splitkeras privacy epsilon --sigma 1.0 --epochs 10 --delta 1e-5
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from splitkeras.cli._common import CliError, add_unsafe

__all__ = ["register", "cmd_audit", "cmd_epsilon"]


def _image_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise CliError(f"privacy audit: --image-shape '{text}' must be HxW or HxWxC, e.g. 8x8")
    return shape


def cmd_audit(args: argparse.Namespace) -> int:
    from splitkeras.cli.train import load_training_data
    from splitkeras.privacy.defences.spec import parse_defence
    from splitkeras.privacy.harness import audit, train_in_process
    from splitkeras.segments import load_split
    from splitkeras.training import restore_compile_value

    if args.epochs < 1 or args.batch_size < 1:
        raise CliError("privacy audit: --epochs and --batch-size must be at least 1")
    shape = _image_shape(args.image_shape)
    defences = [parse_defence(spec, seed=args.seed) for spec in args.defence or []]
    split = load_split(args.split_dir, unsafe_deserialization=args.unsafe_deserialization)
    inputs, outputs = [s.name for s in split.model_inputs], [s.name for s in split.model_outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise CliError("privacy audit: the harness takes models with one input and one output; this one has "
                       f"inputs {inputs} and outputs {outputs}")
    x, y = load_training_data(args.data, inputs, outputs)
    x_test, y_test = load_training_data(args.test, inputs, outputs)
    x_aux = None
    if args.aux is not None:
        x_aux = load_training_data(args.aux, inputs, outputs)[0] if _has_y(args.aux) else _x_only(args.aux)
    training = split.training_config or {}
    loss = restore_compile_value(training.get("loss"))
    if loss is None:
        raise CliError("privacy audit: the split's source model was not compiled (no loss); compile it "
                       "before `splitkeras split`")
    run = train_in_process(split, x, y, defences=defences,
                           optimizer=restore_compile_value(training.get("optimizer")) or "adam", loss=loss,
                           epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    report = audit(run, x_test, y_test, y_train=y, x_train=x if x_aux is not None else None, x_aux=x_aux,
                   image_shape=shape, value_range=args.value_range, pictures=args.pictures, seed=args.seed,
                   decoder_epochs=args.decoder_epochs)
    if args.format == "json":
        print(json.dumps(report, indent=2, default=float))
        return 0
    print(f"{split.model_name} ({report['mode']}), defences: {', '.join(report['defences']) or 'none'}")
    print(f"test accuracy {report['test_accuracy']:.4f}")
    for section in ("labels", "reconstruction"):
        if section in report:
            print(f"{section}: " + ", ".join(f"{k} {v:.4f}" for k, v in report[section].items()))
    if "pictures" in report:
        print(f"pictures: {report['pictures']}")
    return 0


def _has_y(path: str) -> bool:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return "y" in data.files
    except (OSError, ValueError):
        return True  # load_training_data says what is wrong


def _x_only(path: str) -> Any:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        if "x" not in data.files:
            raise CliError(f"privacy audit: '{path}' has no array 'x' (the attacker's inputs)")
        return data["x"]


def cmd_epsilon(args: argparse.Namespace) -> int:
    from splitkeras.privacy.accounting import dp_epsilon

    epsilon = dp_epsilon(args.sigma, args.delta, epochs=args.epochs, samples=args.samples,
                         batch_size=args.batch_size, sampling=args.sampling)
    if args.format == "json":
        print(json.dumps({"epsilon": epsilon, "delta": args.delta, "sigma": args.sigma, "epochs": args.epochs,
                          "sampling": args.sampling}))
    else:
        print(f"epsilon {epsilon:.4f} for delta {args.delta:g} (sigma {args.sigma:g}, {args.epochs} epochs, "
              f"{args.sampling} batches)")
    return 0


def register(sub: Any) -> None:
    """Add the `privacy` command (`audit`, `epsilon`) to the `splitkeras` sub-command parser."""
    from splitkeras.cli._common import Parser

    p = sub.add_parser("privacy", help="attack a split as a curious server would; DP epsilon")
    commands = p.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", parser_class=Parser)
    commands.required = True
    a = commands.add_parser("audit", help="train in process with defences, then attack what the server saw")
    a.add_argument("split_dir", help="a folder written by `splitkeras split` (one server segment)")
    a.add_argument("--data", required=True, metavar="FILE.npz", help="the device's arrays 'x' and 'y'")
    a.add_argument("--test", required=True, metavar="FILE.npz", help="test arrays 'x' and 'y' (accuracy)")
    a.add_argument("--aux", metavar="FILE.npz", help="the attacker's own inputs 'x' (input reconstruction)")
    a.add_argument("--defence", action="append", metavar="SPEC",
                   help="max-norm[:STRENGTH], gradient-noise:SCALE, activation-noise:CLIP,SIGMA, nopeek:ALPHA, "
                   "randomized-response:EPSILON (repeatable)")
    a.add_argument("--epochs", type=int, default=5)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--image-shape", metavar="HxW", help="inputs are images of this shape (SSIM, pictures)")
    a.add_argument("--value-range", type=float, default=1.0, help="the images' value range (SSIM)")
    a.add_argument("--pictures", metavar="FILE.png", help="save device images above their reconstructions")
    a.add_argument("--decoder-epochs", type=int, default=60, help="epochs of the attacker's decoder")
    a.add_argument("--format", choices=["text", "json"], default="text")
    add_unsafe(a)
    a.set_defaults(func=cmd_audit)
    e = commands.add_parser("epsilon", help="the DP epsilon of activation-noise")
    e.add_argument("--sigma", type=float, required=True, help="the noise multiplier")
    e.add_argument("--epochs", type=int, required=True)
    e.add_argument("--delta", type=float, default=1e-5)
    e.add_argument("--sampling", choices=["shuffle", "poisson"], default="shuffle")
    e.add_argument("--samples", type=int, help="training samples (poisson)")
    e.add_argument("--batch-size", type=int, help="batch size (poisson)")
    e.add_argument("--format", choices=["text", "json"], default="text")
    e.set_defaults(func=cmd_epsilon)
