"""splitkeras: split learning for Keras models.

Cut a functional Keras model at named layers; train the head and tail on a device
(TF.js in a React Native app, or the Python client) and the middle on a FastAPI
server. Only activations and gradients cross the network.

Example:
    >>> import splitkeras
    >>> s = splitkeras.split(model, at=["conv2d_3", "dense_1"])     # doctest: +SKIP
    >>> s.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # doctest: +SKIP
    >>> s.fit(x, y, epochs=2)                                          # doctest: +SKIP
    >>> model = s.join()                                               # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib as _importlib
import os as _os
from typing import Any as _Any

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Public names, imported lazily so that `splitkeras --help` does not load TensorFlow.
_EXPORTS = {
    "split": "splitkeras.segments",
    "load_split": "splitkeras.segments",
    "Split": "splitkeras.segments",
    "Segment": "splitkeras.segments",
    "Manifest": "splitkeras.manifest",
    "TensorSpec": "splitkeras.tensor_spec",
    "SplitKerasError": "splitkeras.errors",
    "CutError": "splitkeras.errors",
    "ExportError": "splitkeras.errors",
    "ManifestError": "splitkeras.errors",
    "ModelLoadError": "splitkeras.errors",
    "ProtocolError": "splitkeras.errors",
    "TrainingError": "splitkeras.errors",
    "UnsupportedModelError": "splitkeras.errors",
    "WireFormatError": "splitkeras.errors",
    "load_model": "converters.keras_io",
    "DeviceClient": "splitkeras.client",
}


def __getattr__(name: str) -> _Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitkeras' has no attribute '{name}'")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "__version__",
    "split",
    "load_split",
    "load_model",
    "Split",
    "DeviceClient",
    "Segment",
    "Manifest",
    "TensorSpec",
    "SplitKerasError",
    "CutError",
    "ExportError",
    "ManifestError",
    "ModelLoadError",
    "ProtocolError",
    "TrainingError",
    "UnsupportedModelError",
    "WireFormatError",
]
