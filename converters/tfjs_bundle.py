"""Writing and reading TF.js layers-model bundles (model.json + weight shards).

The format is tfjs-core's `io/types.ts`: `model.json` holds the topology and a
weights manifest; the weights are concatenated in manifest order, little-endian,
and cut into `group1-shard{i}of{n}.bin` files. A weight may be stored quantized
(`uint8`/`uint16`: `value = q * scale + min`, or `float16`); TF.js dequantizes
it to float32 when loading, and so does `read_bundle_weights`.

Example::

    >>> from converters import export_tfjs, load_tfjs_weights
    >>> export_tfjs(model, "out/head_tfjs", quantization="uint8")
    PosixPath('out/head_tfjs/model.json')
    >>> load_tfjs_weights(model, "out/head_tfjs")  # e.g. after the device trained it
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np

from splitkeras.errors import ExportError

from .tfjs_config import flatten_model, tfjs_model_topology, tfjs_named_weights

__all__ = ["export_tfjs", "load_tfjs_weights", "read_bundle_weights", "QUANTIZATIONS"]

QUANTIZATIONS = (None, "float16", "uint8", "uint16")
_SHARD_FILE = re.compile(r"^group\d+-shard\d+of\d+\.bin$")
_BYTES = {"float32": 4, "int32": 4, "uint8": 1, "uint16": 2, "float16": 2}


def _quantize(name: str, values: np.ndarray, quantization: str) -> tuple[bytes, dict[str, Any]]:
    """Encode float32 `values` the way tfjs-converter does; TF.js decodes `q * scale + min`."""
    if quantization == "float16":
        encoded = values.astype("<f2")
        if not np.all(np.isfinite(encoded)):
            raise ExportError(f"weight '{name}' has values beyond the float16 range "
                              f"(max |w| = {np.abs(values).max():.4g} > 65504); "
                              "export it with quantization='uint16' or None")
        return encoded.tobytes(), {"dtype": "float16"}
    dtype = np.dtype("<u1") if quantization == "uint8" else np.dtype("<u2")
    levels = float(np.iinfo(dtype).max)
    low, high = float(values.min()), float(values.max())
    if low == high:  # a constant weight: every value is `min`
        return np.zeros(values.shape, dtype).tobytes(), {"dtype": quantization, "min": low, "scale": 1.0}
    scale = (high - low) / levels
    if low <= 0.0 <= high:  # nudge so that 0 stays exactly 0 (zero biases, zero padding)
        low = -round(-low / scale) * scale
        high = levels * scale + low
    codes = np.clip(np.round((np.clip(values.astype(np.float64), low, high) - low) / scale), 0, levels)
    return codes.astype(dtype).tobytes(), {"dtype": quantization, "min": low, "scale": scale}


def _dequantize(spec: dict[str, Any], raw: bytes) -> np.ndarray:
    quantization = spec["quantization"]
    kind = quantization.get("dtype")
    if kind == "float16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    if kind in ("uint8", "uint16"):
        codes = np.frombuffer(raw, "<u1" if kind == "uint8" else "<u2").astype(np.float64)
        values = codes * float(quantization["scale"]) + float(quantization["min"])  # as TF.js, in doubles
        return np.round(values).astype(np.int32) if spec["dtype"] == "int32" else values.astype(np.float32)
    raise ExportError(f"weight '{spec['name']}' has quantization dtype {kind!r}; "
                      "expected 'uint8', 'uint16' or 'float16'")


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def export_tfjs(model: keras.Model, out_dir: str | Path, *, quantization: str | None = None,
                shard_size_bytes: int = 4 * 1024 * 1024, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` as a TF.js layers-model bundle that `tf.loadLayersModel` reads.

    Every weight is written (trainable and not, e.g. BatchNormalization moving
    statistics), named `<layer>/<weight>` as TF.js expects. Refuses, with an
    ExportError, anything TF.js 4.22 would run differently from Keras (see
    `check_tfjs_supported`). Stale `group*-shard*.bin` files in `out_dir` are removed.

    Args:
        model: a functional (or built Sequential) Keras 3 model.
        out_dir: folder to write; created if missing.
        quantization: None (float32), "float16", "uint8" or "uint16" (affine per weight).
        shard_size_bytes: maximum size of one shard file.
        metadata: JSON-serializable dict stored as `userDefinedMetadata`.

    Returns:
        The path of the written `model.json`.

    Example::

        >>> export_tfjs(head, "out/head_tfjs", quantization="float16", metadata={"segment": "head"})
        PosixPath('out/head_tfjs/model.json')
    """
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization={quantization!r} is not supported; expected one of "
                          f"{list(QUANTIZATIONS)}")
    if not isinstance(shard_size_bytes, int) or shard_size_bytes < 1:
        raise ExportError(f"shard_size_bytes={shard_size_bytes!r} must be a positive integer "
                          "(4 MiB, 4194304, is the TF.js convention)")
    try:
        metadata_json = json.loads(json.dumps(metadata, allow_nan=False)) if metadata is not None else None
    except (TypeError, ValueError) as error:
        raise ExportError(f"metadata is not JSON-serializable ({error}); pass plain dicts, lists, "
                          "strings and finite numbers") from error
    if metadata_json is not None and not isinstance(metadata_json, dict):
        raise ExportError(f"metadata must be a dict, got {type(metadata).__name__}")

    topology = tfjs_model_topology(model)
    specs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, variable in tfjs_named_weights(model):
        values = np.asarray(keras.ops.convert_to_numpy(variable))
        spec: dict[str, Any] = {"name": name, "shape": list(values.shape)}
        if values.dtype.kind == "f":
            values = values.astype(np.float32)
            if not np.all(np.isfinite(values)):
                raise ExportError(f"weight '{name}' contains NaN or infinity; the model is broken, "
                                  "re-train or re-initialize it before exporting")
            spec["dtype"] = "float32"
            if quantization is None:
                chunks.append(values.astype("<f4").tobytes())
            else:
                data, spec["quantization"] = _quantize(name, values, quantization)
                chunks.append(data)
        elif values.dtype.kind in "iu":
            spec["dtype"] = "int32"
            chunks.append(values.astype("<i4").tobytes())
        else:
            raise ExportError(f"weight '{name}' has dtype {values.dtype}; TF.js bundles hold "
                              "float32 or int32 weights")
        specs.append(spec)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if _SHARD_FILE.match(stale.name):
            stale.unlink()
    data = b"".join(chunks)
    count = max(1, math.ceil(len(data) / shard_size_bytes)) if data else 0
    paths = [f"group1-shard{i + 1}of{count}.bin" for i in range(count)]
    for index, path in enumerate(paths):
        _write_atomic(out / path, data[index * shard_size_bytes:(index + 1) * shard_size_bytes])
    model_json: dict[str, Any] = {
        "format": "layers-model",
        "generatedBy": f"keras v{keras.__version__}",
        "convertedBy": "splitkeras converters.export_tfjs",
        "modelTopology": {"keras_version": keras.__version__, "backend": keras.backend.backend(),
                          "model_config": topology},
        "weightsManifest": [{"paths": paths, "weights": specs}],
    }
    if metadata_json is not None:
        model_json["userDefinedMetadata"] = metadata_json
    _write_atomic(out / "model.json", json.dumps(model_json, indent=1).encode())
    return out / "model.json"


def replace_tfjs_bundle(model: keras.Model, model_json: str | Path) -> Path:
    """Re-export `model` as the bundle whose `model.json` is `model_json`: written next to the
    old bundle folder, then swapped in (a reader sees the old bundle or the new one, whole)."""
    import shutil

    model_json = Path(model_json)
    folder = model_json.parent
    fresh = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(fresh, ignore_errors=True)
    export_tfjs(model, fresh, metadata={"splitkeras_segment": model.name})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(fresh, folder)
    return model_json


def read_bundle_weights(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """Every weight of a TF.js bundle, dequantized, by TF.js name (manifest order).

    Example::

        >>> read_bundle_weights("out/head_tfjs")["dense/kernel"].shape
        (784, 128)
    """
    root = Path(bundle_dir)
    try:
        model_json = json.loads((root / "model.json").read_text())
        manifest = model_json["weightsManifest"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"cannot read a TF.js bundle at {root} ({error}); expected a folder with "
                          "model.json (with a weightsManifest) and its weight shards") from error
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        buffers = []
        for relative in group["paths"]:
            path = root / relative
            if path.resolve().parent != root.resolve():
                raise ExportError(f"weight shard path {relative!r} in {root / 'model.json'} leaves "
                                  "the bundle folder; expected a plain file name")
            try:
                buffers.append(path.read_bytes())
            except OSError as error:
                raise ExportError(f"weight shard {path} is missing or unreadable ({error}); "
                                  "copy the whole bundle folder") from error
        data, offset = b"".join(buffers), 0
        for spec in group["weights"]:
            kind = spec.get("quantization", {}).get("dtype", spec.get("dtype"))
            if kind not in _BYTES:
                raise ExportError(f"weight '{spec['name']}' has dtype {kind!r}; expected one of "
                                  f"{sorted(_BYTES)}")
            size = int(np.prod(spec["shape"], dtype=np.int64)) * _BYTES[kind]
            raw = data[offset:offset + size]
            if len(raw) != size:
                raise ExportError(f"the weight shards in {root} end inside weight '{spec['name']}' "
                                  f"(need {offset + size} bytes, have {len(data)}); the bundle is "
                                  "truncated")
            offset += size
            if "quantization" in spec:
                values = _dequantize(spec, raw)
            else:
                values = np.frombuffer(raw, "<f4" if spec["dtype"] == "float32" else "<i4")
            weights[spec["name"]] = values.reshape(spec["shape"]).copy()
        if offset != len(data):
            raise ExportError(f"the weight shards in {root} hold {len(data) - offset} bytes more "
                              "than the manifest describes; the bundle is inconsistent")
    return weights


def load_tfjs_weights(model: keras.Model, bundle_dir: str | Path) -> None:
    """Set `model`'s weights from a TF.js bundle (quantized ones are dequantized).

    Strict: every weight of `model` must be in the bundle with the same shape,
    and the bundle may hold no other weight; nothing is assigned unless all match.

    Example::

        >>> load_tfjs_weights(head, "uploads/device_42/head_tfjs")
    """
    stored = read_bundle_weights(bundle_dir)
    expected = tfjs_named_weights(model)
    missing = [name for name, _ in expected if name not in stored]
    extra = sorted(set(stored) - {name for name, _ in expected})
    mismatched = [f"{name}: bundle {list(stored[name].shape)} vs model {list(variable.shape)}"
                  for name, variable in expected
                  if name in stored and tuple(stored[name].shape) != tuple(variable.shape)]
    problems = []
    if missing:
        problems.append(f"missing from the bundle: {missing}")
    if extra:
        problems.append(f"in the bundle but not in the model: {extra}")
    if mismatched:
        problems.append(f"shape mismatch: {mismatched}")
    if problems:
        raise ExportError(f"the bundle at {bundle_dir} does not fit model '{model.name}' ("
                          + "; ".join(problems) + "); load it into a model with the exported architecture")
    for name, variable in expected:
        variable.assign(stored[name].astype(variable.dtype))
    for item in flatten_model(model).layers:  # Normalization computes its constants from its weights
        if isinstance(item.op, keras.layers.Normalization):
            item.op.finalize_state()
