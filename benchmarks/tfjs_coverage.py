"""Every keras.applications architecture, its head and tail exported to TF.js and checked there.

For each architecture Keras ships (`weights=None`, the smallest input each allows, 10 classes),
the model is cut with `splitkeras.split` about 20% and about 80% through its layers (the first
layer at or after that point where a cut is possible), so that the head (model input -> first
cut) and the U-shaped tail (second cut -> output) run on the device. Both are exported with
`converters.export_tfjs`, run in the real `@tensorflow/tfjs` 4.22 (pure-JS CPU backend,
`mobile_export/tools/tfjs_predict.mjs`) and compared with Keras:

* predict (inference): max |TF.js - Keras| over the outputs / max |Keras output| (floor 1e-5);
* the training pass: the VJP of sum(outputs * g), g random, for every trainable weight and the
  segment's inputs, in training mode (BatchNorm on batch statistics; Dropout rates set to 0),
  per weight max |TF.js - Keras| / max |Keras| (floor 1e-4), against Keras float32 (the
  figure asked for) and against the same Keras model computed in float64;
* the BatchNorm moving statistics after that pass: max |TF.js - Keras| (floor 1e-5).

Float32 itself cannot always resolve these gradients. A training-mode BatchNorm normalizes each
channel over batch x height x width values; deep in these networks (1x1 or 2x2 feature maps at
their minimum input) a channel whose values nearly coincide turns float32 rounding into a large
relative error, and a stack of such layers amplifies it (measured: Keras float32 vs float64 off by
1e-3 to > 1 in some tails, with identical weights and inputs). Where that is so, no float32
implementation can agree with another to 1e-4, so each weight is judged against the float-noise
level Keras float32 itself shows: it passes when TF.js is within 1e-4 of Keras (float32 or
float64), or within NOISE_MARGIN (10) times Keras float32's own deviation from float64 for that
weight (the larger of its own and the segment's median deviation: one float32 run is one
sample of that noise), "at noise level" in the table. The same holds for the input gradients, the weights
whose true gradient is zero (max |float64 gradient| <= 1e-7 of the segment's largest: a bias
feeding a training-mode BatchNorm), held to max(1e-6 of the segment's largest gradient, 10x
Keras' noise), and the moving statistics. To keep the problem resolvable where cheap: tails run
on a batch of 16 (heads 3), and the tails of the MobileNets (V2, V3) and EfficientNets run at a
96x96 input (3x3 at the second cut, see TAIL_INPUT). Kinks: where a ReLU input or a max-pooling
window's two largest values sit within float32 rounding of each other, TF.js and TF may route that
element's gradient differently (a valid subgradient either way), which moves every gradient
upstream of it by up to a few percent; a head holds about a million such elements and about one
in a million sits that close. So each segment runs first on the input draw (of 3) farthest from a
max-pooling tie, and again on the next draw if it fails; a real fault fails every draw, and the
figures of every draw run are kept in the JSON ("draws"). Weights are seeded (reproducible).

The weights are Keras' random initialization, with the BatchNorm gammas and betas, LayerScale
factors and Normalization statistics drawn at random too (so that none is the identity), and the
BatchNorm moving statistics calibrated on a separate batch of 32 images, as a trained network's fit
its data (`calibrate`; rows measured before this have `"statistics": "random"` in the JSON, drawn
at random instead, which is what made most of the "at noise level" passes).
Inputs: images in [0, 255) for architectures that preprocess in the graph
(Rescaling/Normalization), N(0, 1) otherwise; the tail's inputs are the Keras activations of
those images at the second cut.

Run: `.venv/bin/python benchmarks/tfjs_coverage.py [--only ResNet50 VGG16]` (~40 min for all 18
on 2 shared cores; the TF.js CPU backend's convolution gradients are a naive loop). Writes
`results/tfjs_coverage.{json,md}`; `tests/test_tfjs_coverage.py` renders `docs/tfjs-coverage.md`
from the JSON and checks it, and runs a short form of this sweep.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# architecture -> smallest input side keras.applications accepts with weights=None
ARCHITECTURES: dict[str, int] = {
    "Xception": 71, "VGG16": 32, "VGG19": 32, "ResNet50": 32, "ResNet101": 32, "ResNet50V2": 32,
    "ResNet101V2": 32, "InceptionV3": 75, "InceptionResNetV2": 75, "MobileNet": 32, "MobileNetV2": 32,
    "MobileNetV3Small": 32, "MobileNetV3Large": 32, "DenseNet121": 32, "NASNetMobile": 32,
    "EfficientNetB0": 32, "EfficientNetV2B0": 32, "ConvNeXtTiny": 32,
}
# The tails of these run at 96 x 96 (3 x 3 at the second cut) instead: at their minimum input their
# tail works on 1 x 1 feature maps, where a training-mode BatchNorm stack is chaotic in float32
# (Keras' own float32 gradients are off its float64 ones by 20-200%, see the module docstring).
TAIL_INPUT = {"MobileNetV2": 96, "MobileNetV3Small": 96, "MobileNetV3Large": 96, "EfficientNetB0": 96,
              "EfficientNetV2B0": 96}
# The family members not swept (same building blocks, more of them): ResNet152(V2), DenseNet169/201,
# NASNetLarge, EfficientNetB1-B7, EfficientNetV2B1-B3/S/M/L, ConvNeXtSmall/Base/Large/XLarge.
FLOORS = {"predict": 1e-5, "gradient": 1e-4, "moving_statistics": 1e-5, "zero_gradient_noise": 1e-6}
NOISE_MARGIN = 10.0  # x Keras' own float32 error (against float64), where that exceeds the floor
BATCH = {"head": 3, "tail": 16}  # the tails run at 1x1 or 2x2: BatchNorm needs more than 3 samples
CALIBRATE = True  # BatchNorm moving statistics from the data (calibrate), not random
CALIBRATION_BATCH = 32
DRAWS = 3  # input draws per segment; the one whose max-pooling windows are farthest from a tie runs
CUTS = (0.2, 0.8)
TOOL = ROOT / "mobile_export" / "tools" / "tfjs_predict.mjs"
RESULTS = HERE / "results"


def build(name: str, size: int) -> keras.Model:
    return getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)


def prepare(model: keras.Model, seed: int) -> None:
    """Random BatchNorm statistics and affine weights, LayerScale factors, Normalization stats."""
    rng = np.random.default_rng(seed)

    def layers(m: keras.Model) -> list[Any]:
        out = []
        for layer in m.layers:
            out += layers(layer) if isinstance(layer, keras.Model) else [layer]
        return out

    for layer in layers(model):
        kind = type(layer).__name__
        for variable in layer.weights:
            shape, name = tuple(variable.shape), variable.name
            if kind == "BatchNormalization" and name in ("moving_variance", "gamma"):
                variable.assign(rng.uniform(0.8, 1.2, shape).astype("float32"))
            elif kind == "BatchNormalization" and name in ("moving_mean", "beta"):
                variable.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
            elif kind == "LayerScale":
                variable.assign(rng.uniform(0.2, 1.0, shape).astype("float32"))
            elif kind == "Normalization" and name in ("mean", "variance"):
                value = rng.uniform(100.0, 140.0, shape) if name == "mean" else rng.uniform(2500.0, 4000.0, shape)
                variable.assign(value.astype("float32"))
        if kind == "Normalization":
            layer.finalize_state()


def _all_layers(model: keras.Model) -> list[Any]:
    out = []
    for layer in model.layers:
        out += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return out


def calibrate(model: keras.Model, images: np.ndarray) -> None:
    """BatchNorm moving statistics that fit the data, as a trained network's do: each one's input
    batch mean and variance over `images` in one training-mode pass (momentum 0; every BatchNorm
    must be trainable then, else Keras runs it in inference mode). Random statistics instead leave
    many channels nearly constant over a batch deep in the network (the inference-mode activations
    a tail receives): there a training-mode BatchNorm divides rounding noise by a tiny deviation and
    float32 cannot resolve the gradients (Keras float32 off float64 by up to 1e+1; calibrated, the
    MobileNet and MobileNetV3Small tails drop from 1.4e+1 and 5.1e-3 to 1.3e-6 and 1.5e-6)."""
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def _images(model: keras.Model, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Images in [0, 255) where the architecture preprocesses in the graph, else N(0, 1)."""
    shape = (batch, *model.input_shape[1:])
    return (rng.uniform(0.0, 255.0, shape) if preprocesses(model) else rng.normal(0.0, 1.0, shape)).astype(np.float32)


def preprocesses(model: keras.Model) -> bool:
    return any(type(layer).__name__ in ("Rescaling", "Normalization") for layer in model.layers[:4])


def pick_cuts(model: keras.Model, fractions: tuple[float, float] = CUTS) -> tuple[list[str], Any]:
    """The first layers at or after `fractions` of model.layers where splitkeras can cut."""
    import splitkeras
    from splitkeras.errors import CutError

    names = [layer.name for layer in model.layers]

    def candidates(fraction: float) -> list[str]:
        start = max(1, int(round(fraction * (len(names) - 1))))
        return names[start:-1]

    first_error = None
    for first in candidates(fractions[0])[:60]:
        for second in candidates(fractions[1])[:60]:
            if names.index(second) <= names.index(first):
                continue
            try:
                return [first, second], splitkeras.split(model, at=[first, second])
            except CutError as error:
                first_error = first_error or error
                continue
    raise RuntimeError(f"no cut found near {fractions} of {model.name}: {first_error}")


def _encode(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(data).decode()}


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


def _pool_gap(model: keras.Model, inputs: list[np.ndarray]) -> float:
    """The smallest relative gap between the two largest values of a max-pooling window (training
    pass): below float32 rounding, TF.js and TF may route that window's gradient differently."""
    pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)
             and np.prod(layer.pool_size) > 1]  # ResNetV2's 1x1 max pooling has no ties
    if not pools:
        return float("inf")
    probe = keras.Model(model.inputs, [layer.input for layer in pools])
    values = _as_list(probe(inputs if len(inputs) > 1 else inputs[0], training=True))
    gap = float("inf")
    for layer, value in zip(pools, values):
        x = np.asarray(value)
        (kh, kw), (sh, sw) = layer.pool_size, layer.strides
        if layer.padding == "same":
            pads = [(0, 0)] + [((max((-(-n // st) - 1) * st + k - n, 0)) // 2,
                                max((-(-n // st) - 1) * st + k - n, 0) - (max((-(-n // st) - 1) * st + k - n, 0)) // 2)
                               for n, k, st in ((x.shape[1], kh, sh), (x.shape[2], kw, sw))] + [(0, 0)]
            x = np.pad(x, pads, constant_values=-np.inf)
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
        windows = np.sort(windows.reshape(-1, kh * kw), axis=1)
        top, second = windows[:, -1], windows[:, -2]
        finite = np.isfinite(second)
        rel = (top[finite] - second[finite]) / np.maximum(np.abs(top[finite]), 1e-30)
        gap = min(gap, float(rel.min()) if rel.size else gap)
    return gap


def _segment_inputs(model: keras.Model, split: Any, part: str, batch: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Images for the head; for the tail, Keras' activations of images at the second cut."""
    images = _images(model, batch, rng)
    values = {split.segments[0].inputs[0].name: images}
    if part == "tail":
        for segment in split.segments[:-1]:
            feed = [values[s.name] for s in segment.inputs]
            outs = _as_list(segment.model(feed if len(feed) > 1 else feed[0], training=False))
            values.update({spec.name: np.asarray(o) for spec, o in zip(segment.outputs, outs)})
    segment = split.segments[0] if part == "head" else split.segments[-1]
    return [values[s.name] for s in segment.inputs]


def _run_node(jobs: list[dict[str, Any]], work: Path, tag: str, timeout: float) -> None:
    job_file, out_file = work / f"{tag}_jobs.json", work / f"{tag}_results.json"
    job_file.write_text(json.dumps({"jobs": jobs}))
    done = subprocess.run(["node", str(TOOL), str(job_file), str(out_file)], cwd=TOOL.parents[1],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"tfjs_predict.mjs failed on {tag}:\n{done.stderr[-3000:]}")


def _check_one(name: str, index: int, batch: dict[str, int], seed: int, work: Path,
               timeout: float, parts: tuple[str, ...] = ("head", "tail")) -> dict[str, Any]:
    """Both segments of one architecture. Each runs on the input draw farthest from a max-pooling
    tie; one that fails runs again on the next draw (up to DRAWS): two float32 implementations
    also disagree where a ReLU input or a max-pooling window sits within rounding of its kink
    (about one such element in a million, and a head holds about a million), which moves that
    element's gradient and every gradient upstream of it; a real fault fails on every draw."""
    from converters import export_tfjs

    started = time.perf_counter()
    sizes = {"head": ARCHITECTURES[name], "tail": TAIL_INPUT.get(name, ARCHITECTURES[name])}
    row: dict[str, Any] = {"input": sizes["head"], "tail_input": sizes["tail"],
                           "statistics": "calibrated" if CALIBRATE else "random"}
    states: dict[str, dict[str, Any]] = {}
    for part in parts:
        if part == parts[0] or sizes["tail"] != sizes["head"]:
            keras.utils.clear_session()  # the same automatic layer names in both builds
            keras.utils.set_random_seed(1000 * seed + index)
            model = build(name, sizes[part])
            prepare(model, seed + index)
            if CALIBRATE:
                calibrate(model, _images(model, CALIBRATION_BATCH, np.random.default_rng([seed, index, 99])))
            cuts, split = pick_cuts(model)
            row.update(layers=len(model.layers), cuts=cuts, parameters=int(model.count_params()))
        segment = split.segments[0] if part == "head" else split.segments[-1]
        seg_model = segment.model
        for layer in seg_model.layers:  # Dropout at rate 0 for the comparison
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        rng = np.random.default_rng([seed, index, part == "tail"])
        draws = [_segment_inputs(model, split, part, batch[part], rng) for _ in range(DRAWS)]
        gaps = [_pool_gap(seg_model, inputs) for inputs in draws]
        order = [int(i) for i in np.argsort(gaps)[::-1]]
        bundle = work / f"{name}_{part}"
        export_tfjs(seg_model, bundle)
        topology = json.loads((bundle / "model.json").read_text())["modelTopology"]["model_config"]
        custom = sorted({layer["class_name"] for layer in topology["config"]["layers"]
                         if layer["class_name"].startswith("Splitkeras")})
        states[part] = {"model": seg_model, "draws": [draws[i] for i in order], "gaps": [gaps[i] for i in order],
                        "saved": [np.asarray(v) for v in seg_model.non_trainable_weights], "rng": rng,
                        "bundle": bundle, "tried": []}
        row[part] = {"layers": len(seg_model.layers), "parameters": int(seg_model.count_params()),
                     "runtime_classes": custom, "batch": batch[part], "input": sizes[part],
                     "feature_map": [list(a.shape[1:-1]) for a in draws[0]] if part == "tail" else None}
    row["keras_seconds"] = round(time.perf_counter() - started, 1)
    pending = list(parts)
    for attempt in range(DRAWS):
        jobs = []
        for part in pending:
            state = states[part]
            for variable, value in zip(state["model"].non_trainable_weights, state["saved"]):
                variable.assign(value)  # the exported statistics (a reference pass moves them)
            state["reference"] = keras_reference(state["model"], state["draws"][attempt], state["rng"])
            jobs.append({"id": part, "bundle_dir": str(state["bundle"]),
                         "inputs": [_encode(a) for a in state["draws"][attempt]],
                         "upstream": [_encode(g) for g in state["reference"]["upstream"]],
                         "return_weights": "non_trainable", "result_file": str(work / f"{name}_{part}.json")})
        _run_node(jobs, work, name, timeout)
        still = []
        for part in pending:
            state = states[part]
            result = json.loads((work / f"{name}_{part}.json").read_text())
            figures = compare(state["reference"], result)
            figures["ok"] = passes(figures)
            gap = state["gaps"][attempt]
            state["tried"].append({key: figures.get(key) for key in ("ok", "gradient_vs_keras", "gradient",
                                                                     "keras_float32_error", "input_gradient")}
                                  | {"pool_gap": None if gap == float("inf") else gap})
            if figures["ok"] or attempt == DRAWS - 1:
                row[part].update(figures, draws=state["tried"], tfjs_seconds=result.get("seconds"),
                                 pool_gap=None if gap == float("inf") else gap)
            else:
                still.append(part)
        pending = still
        if not pending:
            break
    return row


def check_architectures(names: list[str], *, batch: dict[str, int] | None = None, seed: int = 0,
                        work: Path | None = None, parts: dict[str, tuple[str, ...]] | None = None,
                        timeout: float = 3000.0, log: Any = None) -> dict[str, Any]:
    """Export, run in TF.js and compare the head and tail of each architecture; figures by name.
    One node process per architecture (its results can be large: VGG's tail has 19M weights)."""
    work = Path(work or tempfile.mkdtemp(prefix="tfjs_coverage_"))
    rows: dict[str, Any] = {}
    for index, name in enumerate(names):
        rows[name] = _check_one(name, index, batch or BATCH, seed, work, timeout,
                                (parts or {}).get(name, ("head", "tail")))
        if log:
            row = rows[name]
            seconds = {part: row[part].get("tfjs_seconds") for part in ("head", "tail") if part in row}
            oks = {part: row[part].get("ok") for part in ("head", "tail") if part in row}
            print(f"{name}: cut at {row['cuts']}, Keras {row['keras_seconds']} s, TF.js {seconds} s; ok {oks}",
                  file=log, flush=True)
        for stale in work.glob(f"{name}_*"):  # bundles and results can be hundreds of MB
            if stale.is_dir():
                import shutil

                shutil.rmtree(stale)
            else:
                stale.unlink()
    return {"architectures": rows, "batch": batch or BATCH, "floors": FLOORS, "noise_margin": NOISE_MARGIN}


def _figure(value: float) -> str:
    return f"{value:.1e}"


def render_markdown(data: dict[str, Any]) -> str:
    """docs/tfjs-coverage.md from the results JSON."""
    rows = data["architectures"]
    parts = [(name, part, row[part]) for name, row in rows.items() for part in ("head", "tail") if part in row]
    lines = [
        "# TF.js coverage of keras.applications",
        "",
        "Generated by `tests/test_tfjs_coverage.py` from `benchmarks/results/tfjs_coverage.json`",
        "(written by `benchmarks/tfjs_coverage.py`, whose docstring has the full protocol; do not edit by hand).",
        "",
        "Every architecture Keras ships (`weights=None`, the smallest input it allows, 10 classes) is cut with "
        f"`splitkeras.split` about {int(CUTS[0] * 100)}% and {int(CUTS[1] * 100)}% through its layers; the head "
        "(input -> first cut) and the U-shaped tail (second cut -> output) are exported with "
        "`converters.export_tfjs` and run in `@tensorflow/tfjs` 4.22 under Node (pure-JS CPU backend) against "
        f"Keras {data.get('keras', '')} / TensorFlow {data.get('tensorflow', '')} "
        f"(TF_ENABLE_ONEDNN_OPTS={data.get('onednn', 'default')}).",
        "",
        "* **predict**: max |TF.js - Keras| / max |Keras output|, inference (floor "
        f"{_figure(FLOORS['predict'])}).",
        "* **grad vs Keras**: the worst trainable weight of the training-mode VJP of sum(outputs * g), "
        "max |TF.js - Keras float32| / max |Keras float32| (floor "
        f"{_figure(FLOORS['gradient'])}; Dropout at rate 0). **TF.js vs f64** and **Keras f32 vs f64**: the "
        "same, both against the same Keras model computed in float64. Where Keras float32 itself is off "
        "float64 by more than the floor (deep training-mode BatchNorm stacks on 1x1-2x2 feature maps: float32 "
        "cannot resolve those gradients), a weight passes at the float-noise level: TF.js within "
        f"{data.get('noise_margin', NOISE_MARGIN):g}x Keras float32's own deviation (for that weight, or the "
        "segment's median deviation where larger). **weights**: within the "
        "floor + at noise level / all (weights whose true gradient is zero, held to the float-noise level, "
        "not counted).",
        "* **BN stats**: max |TF.js - Keras| of the moving statistics after that pass (floor "
        f"{_figure(FLOORS['moving_statistics'])}).",
        f"* batch: head {data['batch']['head']}, tail {data['batch']['tail']}.",
        "",
        "* **draws**: input draws run; a second one runs when the first fails: two float32 implementations "
        "also part where a ReLU input or a max-pooling window sits within rounding of its kink (about one "
        "element in a million; a head holds about that many), which moves every gradient upstream of it. A real "
        "fault fails every draw; the failed draws are in the JSON.",
        "",
        "| architecture | part | input | cut after | layers | predict | grad vs Keras | TF.js vs f64 "
        "| Keras f32 vs f64 | weights | BN stats | runtime classes | TF.js s | draws | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, part, figures in parts:
        row = rows[name]
        cut = row["cuts"][0] if part == "head" else row["cuts"][1]
        lead = f"| {name if part == 'head' else ''} | {part} | {figures.get('input', row['input'])} | `{cut}` |"
        if "error" in figures:
            lines.append(f"{lead} {figures['layers']} | error: {figures['error'][:120]} | | | | | | | | | no |")
            continue
        classes = ", ".join(c.removeprefix("Splitkeras") for c in figures["runtime_classes"]) or "-"
        counted = figures["weights"] - figures["zero_gradient_weights"]
        weights = f"{figures['weights_within_1e-4']} + {figures['weights_at_noise_level']} / {counted}"
        lines.append(
            f"{lead} {figures['layers']} | {_figure(figures['predict'])} | {_figure(figures['gradient_vs_keras'])} | "
            f"{_figure(figures['gradient'])} | {_figure(figures['keras_float32_error'])} | {weights} | "
            f"{_figure(figures['moving_statistics'])} | {classes} | {figures.get('tfjs_seconds') or 0:.0f} | "
            f"{len(figures.get('draws', [None]))} | {'yes' if figures['ok'] else '**no**'} |")
    good = [f for _, _, f in parts if "error" not in f]
    ok = sum(f.get("ok", False) for f in good)
    strict = sum(f["weights_at_noise_level"] == 0 and not f["failed"] for f in good)
    random_rows = [name for name, row in rows.items() if row.get("statistics", "random") == "random"]
    resolved = [f for f in good if f["keras_float32_error"] <= FLOORS["gradient"]]
    lines += [
        "",
        f"{ok} of {len(parts)} segments meet every floor. Worst predict over all: "
        f"{_figure(max(f['predict'] for f in good))}; worst BN statistics: "
        f"{_figure(max(f['moving_statistics'] for f in good))}. Where float32 resolves the gradients (Keras "
        f"f32 vs f64 within the floor: {len(resolved)} segments), the worst TF.js gradient is "
        f"{_figure(max((f['gradient_vs_keras'] for f in resolved), default=0.0))} against Keras float32 and "
        f"{_figure(max((f['gradient'] for f in resolved), default=0.0))} against float64. {strict} of "
        f"{len(parts)} segments have every weight's gradient strictly within {_figure(FLOORS['gradient'])} "
        "(none at the noise level).",
        "",
        "BatchNorm moving statistics: calibrated on the data (see `calibrate` in the sweep) for "
        + (", ".join(name for name in rows if name not in random_rows) or "none")
        + "; drawn at random (the sweep before calibration) for " + (", ".join(random_rows) or "none") + ".",
        "",
        "Runtime classes: the layers of `mobile_export/src/layers/` the segment uses (TF.js 4.22 lacks them or "
        "trains them wrongly; see `mobile_export/src/layers/table.json`). Not swept (same building blocks, more "
        "of them): ResNet152(V2), DenseNet169/201, NASNetLarge, EfficientNetB1-B7, EfficientNetV2B1-B3/S/M/L, "
        "ConvNeXtSmall/Base/Large/XLarge.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="architectures (default: all); merged into the results")
    parser.add_argument("--head-batch", type=int, default=BATCH["head"])
    parser.add_argument("--tail-batch", type=int, default=BATCH["tail"])
    args = parser.parse_args()
    names = args.only or list(ARCHITECTURES)
    path = RESULTS / "tfjs_coverage.json"
    data: dict[str, Any] = {"architectures": {}}
    if args.only and path.exists():
        data = json.loads(path.read_text())
    RESULTS.mkdir(exist_ok=True)
    started = time.perf_counter()
    for name in names:  # written after each architecture: a long sweep keeps what it measured
        one = check_architectures([name], batch={"head": args.head_batch, "tail": args.tail_batch}, log=sys.stderr,
                                  seed=list(ARCHITECTURES).index(name))
        data["architectures"][name] = one["architectures"][name]
        data["architectures"] = {n: data["architectures"][n] for n in ARCHITECTURES if n in data["architectures"]}
        data.update({key: value for key, value in one.items() if key != "architectures"},
                    keras=keras.__version__, tensorflow=tf.__version__,
                    onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                    seconds=round(time.perf_counter() - started, 1))
        path.write_text(json.dumps(data, indent=1, default=float) + "\n")
        (RESULTS / "tfjs_coverage.md").write_text(render_markdown(data))
    print(render_markdown(data))


if __name__ == "__main__":
    main()
