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

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from splitkeras.errors import (  # noqa: E402
    CutError,
    ManifestError,
    ModelLoadError,
    ProtocolError,
    SplitKerasError,
    TrainingError,
    UnsupportedModelError,
    WireFormatError,
)
from splitkeras.manifest import Manifest  # noqa: E402
from splitkeras.split import Segment, Split, load_split, split  # noqa: E402
from splitkeras.tensor_spec import TensorSpec  # noqa: E402


def load_model(path: str, *, unsafe_deserialization: bool = False, compile: bool = True):  # type: ignore[no-untyped-def]
    """Load a `.keras` or `.h5` model file in Keras safe mode (Lambda layers refused)."""
    from converters.keras_io import load_model as _load

    return _load(path, unsafe_deserialization=unsafe_deserialization, compile=compile)


__all__ = [
    "__version__",
    "split",
    "load_split",
    "load_model",
    "Split",
    "Segment",
    "Manifest",
    "TensorSpec",
    "SplitKerasError",
    "CutError",
    "ManifestError",
    "ModelLoadError",
    "ProtocolError",
    "TrainingError",
    "UnsupportedModelError",
    "WireFormatError",
]
