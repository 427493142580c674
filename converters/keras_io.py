"""Loading Keras model files (`.keras` and legacy `.h5`) the way splitkeras needs.

Loading is safe by default, as in Keras: a model with a `Lambda` layer (which runs
arbitrary Python) is refused unless the caller opts in with
`unsafe_deserialization=True`. The check reads the saved config before anything is
deserialized, for `.keras` and for `.h5` files alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitkeras.errors import ModelLoadError

__all__ = ["load_model", "read_model_config", "file_sha256", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".keras", ".h5", ".hdf5")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model config saved in a `.keras` or `.h5` file, without deserializing it."""
    path = Path(path)
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            if raw is None:
                raise ModelLoadError(
                    f"'{path}' is an HDF5 file without a model config (a weights-only file?). "
                    "Save the whole model with model.save('model.h5') or model.save('model.keras')."
                )
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            return json.loads(raw)
    except ModelLoadError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise ModelLoadError(f"Cannot read '{path}' as a Keras model file: {error}.") from None


def _layer_configs(config: Any) -> Iterator[dict[str, Any]]:
    if isinstance(config, dict):
        if "class_name" in config:
            yield config
        for value in config.values():
            yield from _layer_configs(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layer_configs(value)


def load_model(
    path: str | os.PathLike[str],
    *,
    unsafe_deserialization: bool = False,
    compile: bool = True,
) -> Any:
    """Load a `.keras` or `.h5` model file.

    Args:
        path: the model file.
        unsafe_deserialization: allow `Lambda` layers (they run arbitrary code).
        compile: restore the saved compile config (optimizer, loss, metrics).

    Raises:
        ModelLoadError: the file is missing, not a model, or has a Lambda layer in safe mode.

    Example:
        >>> model = load_model("model.h5")                 # doctest: +SKIP
    """
    import keras

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"Model file '{path}' does not exist.")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise ModelLoadError(
            f"'{path.name}' is not a Keras model file: expected a name ending in "
            f"{', '.join(SUPPORTED_SUFFIXES)}."
        )
    config = read_model_config(path)
    if not unsafe_deserialization:
        lambdas = [c.get("config", {}).get("name", "?") for c in _layer_configs(config)
                   if c.get("class_name") == "Lambda"]
        if lambdas:
            raise ModelLoadError(
                f"'{path.name}' has Lambda layer(s) {lambdas}, which run arbitrary Python code when "
                "loaded, so they are refused in safe mode. If you trust this file, pass "
                "--unsafe-deserialization (Python: unsafe_deserialization=True)."
            )
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=not unsafe_deserialization)
    except Exception as error:  # Keras raises many types for unreadable models
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"Keras could not load '{path.name}': {message}") from None
