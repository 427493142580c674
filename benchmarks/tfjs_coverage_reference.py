"""The Keras side of `benchmarks/tfjs_coverage.py`: a segment's predict and training-pass VJP in
Keras float32 and float64, the comparison of TF.js' figures with them, and the floors they are
held to (see that module's docstring for the protocol)."""

from __future__ import annotations

import base64
from typing import Any

import keras
import numpy as np
import tensorflow as tf

__all__ = ["FLOORS", "NOISE_MARGIN", "compare", "float64_twin", "keras_reference", "passes"]

FLOORS = {"predict": 1e-5, "gradient": 1e-4, "moving_statistics": 1e-5, "zero_gradient_noise": 1e-6}
NOISE_MARGIN = 10.0  # x Keras' own float32 error (against float64), where that exceeds the floor


def _decode(tensor: dict[str, Any]) -> np.ndarray:
    dtype = "<i4" if tensor["dtype"] == "int32" else "<f4"
    return np.frombuffer(base64.b64decode(tensor["data"]), dtype).reshape(tensor["shape"])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def float64_twin(model: keras.Model) -> keras.Model:
    """The same segment computing in float64 (same config, float64 dtype policies, same weights)."""
    def to64(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj.get("class_name") == "DTypePolicy":
                return {**obj, "config": {**obj.get("config", {}), "name": "float64"}}
            return {key: to64(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [to64(value) for value in obj]
        return "float64" if obj == "float32" else obj

    twin = keras.Model.from_config(to64(model.get_config()))
    twin.set_weights([w.astype(np.float64) if w.dtype.kind == "f" else w for w in model.get_weights()])
    for layer in twin.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
    return twin


def _vjp(model: keras.Model, inputs: list[np.ndarray], upstream: list[np.ndarray]) -> tuple[list, list, list]:
    variables = [tf.Variable(a) for a in inputs]
    with tf.GradientTape() as tape:
        outputs = _as_list(model(variables if len(variables) > 1 else variables[0], training=True))
        objective = tf.add_n([tf.reduce_sum(o * tf.cast(g, o.dtype)) for o, g in zip(outputs, upstream)])
    trainable = list(model.trainable_weights)
    grads = tape.gradient(objective, trainable + variables)
    return ([np.asarray(o) for o in outputs], [np.asarray(tf.convert_to_tensor(g)) for g in grads[:len(trainable)]],
            [np.asarray(g) for g in grads[len(trainable):]])


def keras_reference(model: keras.Model, inputs: list[np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    """Keras predict, the training-mode VJP of sum(out * g) in float32 and in float64 (the same
    model and weights), and every non-trainable weight after each pass."""
    from converters.tfjs_config import tfjs_named_weights

    names = [dict((id(v), n) for n, v in tfjs_named_weights(model))[id(v)] for v in model.trainable_weights]
    moving = [(n, v) for n, v in tfjs_named_weights(model) if not v.trainable]
    feed = inputs if len(inputs) > 1 else inputs[0]
    predict = [np.asarray(o) for o in _as_list(model(feed, training=False))]
    upstream = [rng.normal(size=p.shape).astype(np.float32) for p in predict]
    twin = float64_twin(model)  # before the float32 pass moves the statistics
    training, grads, input_grads = _vjp(model, inputs, upstream)
    _, grads64, input_grads64 = _vjp(twin, [a.astype(np.float64) for a in inputs], upstream)
    twin_moving = [v for v in twin.weights if not v.trainable]  # same order as the model's
    order = [v for v in model.weights if not v.trainable]
    after64 = {n: np.asarray(twin_moving[[id(o) for o in order].index(id(v))]) for n, v in moving}
    return {
        "predict": predict, "upstream": upstream, "training": training,
        "gradients": dict(zip(names, grads)), "gradients64": dict(zip(names, grads64)),
        "input_gradients": input_grads, "input_gradients64": input_grads64,
        "after": {n: np.asarray(v) for n, v in moving}, "after64": after64,
    }


def _relative(got: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return float(np.abs(got - reference).max()) / scale if scale else float(np.abs(got).max(initial=0.0))


def compare(reference: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one segment (see the module docstring)."""
    if "error" in result or "training_error" in result:
        return {"error": result.get("error") or result["training_error"]}
    outputs = [_decode(t) for t in result["outputs"]]
    scale = max(float(np.abs(p).max()) for p in reference["predict"])
    predict = max(float(np.abs(o - p).max()) for o, p in zip(outputs, reference["predict"])) / scale
    training_scale = max(float(np.abs(p).max()) for p in reference["training"])
    training = max(float(np.abs(_decode(o) - p).max())
                   for o, p in zip(result["training_outputs"], reference["training"])) / training_scale
    grads, grads64 = reference["gradients"], reference["gradients64"]
    largest = max((float(np.abs(g).max()) for g in grads64.values() if g.size), default=0.0)
    figures: dict[str, Any] = {
        "gradient_vs_keras": 0.0, "worst_weight": None, "gradient": 0.0, "keras_float32_error": 0.0,
        "weights_within_1e-4": 0, "weights_at_noise_level": 0, "failed": [], "zero_gradient_weights": 0,
        "zero_gradient_noise": 0.0, "keras_zero_gradient_noise": 0.0}
    nonzero = {name: truth for name, truth in grads64.items()
               if truth.size and float(np.abs(truth).max()) > 1e-7 * largest}
    # the float-noise level of a weight's gradient: Keras float32's own deviation from float64 for it,
    # or the segment's median deviation where that weight's happens to be smaller (one sample of noise)
    median_noise = float(np.median([_relative(grads[name].astype(np.float64), truth)
                                    for name, truth in nonzero.items()])) if nonzero else 0.0
    figures["keras_float32_median_error"] = median_noise
    for name, truth in grads64.items():
        if not truth.size:
            continue
        got = _decode(result["gradients"][name]).astype(np.float64)
        keras32 = grads[name].astype(np.float64)
        if name not in nonzero:  # a true-zero gradient: float noise on both sides
            figures["zero_gradient_weights"] += 1
            figures["zero_gradient_noise"] = max(figures["zero_gradient_noise"],
                                                 float(np.abs(got - truth).max()) / largest)
            figures["keras_zero_gradient_noise"] = max(figures["keras_zero_gradient_noise"],
                                                       float(np.abs(keras32 - truth).max()) / largest)
            continue
        versus_keras = _relative(got, keras32)
        ours, own = _relative(got, truth), _relative(keras32, truth)
        noise = max(own, median_noise)
        figures["keras_float32_error"] = max(figures["keras_float32_error"], own)
        if versus_keras > figures["gradient_vs_keras"]:
            figures["gradient_vs_keras"], figures["worst_weight"] = versus_keras, name
        figures["gradient"] = max(figures["gradient"], ours)
        if versus_keras <= FLOORS["gradient"] or ours <= FLOORS["gradient"]:
            figures["weights_within_1e-4"] += 1
        elif ours <= NOISE_MARGIN * noise:
            figures["weights_at_noise_level"] += 1
        else:
            figures["failed"].append(name)
    inputs, inputs_noise = 0.0, 0.0
    for got, ref32, ref64 in zip(result["input_gradients"], reference["input_gradients"],
                                 reference["input_gradients64"]):
        inputs = max(inputs, min(_relative(_decode(got).astype(np.float64), ref64), _relative(_decode(got), ref32)))
        inputs_noise = max(inputs_noise, _relative(ref32.astype(np.float64), ref64))
    after = result["weights"]
    moving = max((float(np.abs(_decode(after[name]) - ref).max()) for name, ref in reference["after"].items()),
                 default=0.0)
    moving_noise = max((float(np.abs(ref - reference["after64"][name]).max())
                        for name, ref in reference["after"].items()), default=0.0)
    return {"predict": predict, "output_scale": scale, "training_outputs": training, **figures,
            "weights": len(grads), "input_gradient": inputs, "keras_input_gradient_error": inputs_noise,
            "moving_statistics": moving, "keras_moving_statistics_error": moving_noise,
            "moving_weights": sum(1 for name in reference["after"] if "moving" in name)}


def passes(figures: dict[str, Any]) -> bool:
    """Every floor met: predict; each weight's gradient within 1e-4 of Keras' (float32 or float64),
    or, where Keras' own float32 gradient is off its float64 one by more, within NOISE_MARGIN times
    that float-noise level; the same for the input gradients, the zero gradients and the moving
    statistics."""
    if "error" in figures:
        return False
    return (figures["predict"] <= FLOORS["predict"] and not figures["failed"]
            and figures["input_gradient"] <= max(FLOORS["gradient"],
                                                 NOISE_MARGIN * figures["keras_input_gradient_error"])
            and figures["zero_gradient_noise"] <= max(FLOORS["zero_gradient_noise"],
                                                      NOISE_MARGIN * figures["keras_zero_gradient_noise"])
            and figures["moving_statistics"] <= max(FLOORS["moving_statistics"],
                                                    NOISE_MARGIN * figures["keras_moving_statistics_error"]))
