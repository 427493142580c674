"""What the `splitkeras` commands share: the one-line error, the parser that raises it,
muting TensorFlow's start-up, and loading a model file.

The command modules import from here and from the core, never from `splitkeras.cli`
(which lists them). Nothing here imports TensorFlow at module level: `splitkeras --help`
stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["CliError", "Parser", "quiet_tensorflow", "load", "add_unsafe", "add_compress", "compress_spec"]


class CliError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        raise CliError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def quiet_tensorflow() -> None:
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


def load(path: str, unsafe: bool) -> Any:
    """The model in a `.keras` / `.h5` file, and its `source` record (file name, SHA-256)."""
    from converters.keras_io import file_sha256, load_model

    model = load_model(path, unsafe_deserialization=unsafe)
    return model, {"file": Path(path).name, "sha256": file_sha256(path)}


def compress_spec(text: str) -> str:
    """`--compress` SPEC, canonical; an `ArgumentTypeError` saying the syntax when it is not one."""
    from splitkeras.codecs import format_compress, parse_compress

    try:
        return format_compress(parse_compress(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_compress(parser: argparse.ArgumentParser) -> None:
    """`--compress SPEC` and its older form `--wire-dtype`."""
    parser.add_argument("--compress", metavar="SPEC", type=compress_spec,
                        help="codec per direction: one of float32, float16, bfloat16, int8, topk:F, "
                        "topk:F+int8 for both, or forward=CODEC,backward=CODEC (docs/protocol.md, Codecs)")
    parser.add_argument("--wire-dtype", choices=["float32", "float16"], default="float32",
                        help="dtype of tensors on the wire, both directions (an alias: --compress float16)")


def add_unsafe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unsafe-deserialization", action="store_true",
                        help="allow Lambda layers (they run arbitrary code; only for files you trust)")
