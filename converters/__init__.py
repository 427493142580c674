"""Keras 3 -> TensorFlow.js layers-model export (and reading the weights back).

The device runs the head and tail segments with `@tensorflow/tfjs` 4.22.
`export_tfjs` writes a bundle that `tf.loadLayersModel` loads and that computes
what Keras computes (each supported layer has a numeric test in real TF.js);
anything TF.js would misread is refused with an `ExportError`.

Example::

    >>> from converters import check_tfjs_supported, export_tfjs, load_tfjs_weights
    >>> check_tfjs_supported(head)
    >>> export_tfjs(head, "out/head_tfjs", quantization="float16")
    PosixPath('out/head_tfjs/model.json')
    >>> load_tfjs_weights(head, "out/head_tfjs")
"""

from __future__ import annotations

from .tfjs_bundle import export_tfjs, load_tfjs_weights, replace_tfjs_bundle
from .tfjs_config import SUPPORTED_LAYERS, check_tfjs_supported

__all__ = ["SUPPORTED_LAYERS", "check_tfjs_supported", "export_tfjs", "load_tfjs_weights", "replace_tfjs_bundle"]
