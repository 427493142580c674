"""A transfer-learning model with a real keras.applications base, its head on the phone.

`base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))`
is nested in `image -> base -> GlobalAveragePooling2D -> Dense(10)` and partly trainable, as one
fine-tunes: the last block and `Conv_1` train (BatchNorm on batch statistics), the rest is
frozen (its BatchNorms run on their moving statistics, in inference mode). The cut after the
pooling puts the whole base in the head: it is exported as ONE device segment (the nested model
inlined, its weights named `<base>/<layer>/<weight>`), loaded by a plain `tf.loadLayersModel` in
the real @tensorflow/tfjs under Node with the runtime's layers registered
(`mobile_export/tools/tfjs_predict.mjs`), and held to the coverage sweep's floors
(`benchmarks/tfjs_coverage.py`): the training-mode gradient of every trainable weight and of the
input within 1e-4 of Keras (strictly: the frozen BatchNorm statistics are calibrated on data, as
a pretrained base's are, which keeps the problem resolvable in float32), moving statistics within
1e-5 (the frozen ones unchanged); predict within 1e-5 of Keras or, as the sweep judges what float32
cannot resolve, within 10x Keras float32's own deviation from float64 (154 layers of float32
inference: Keras itself is ~2e-5 off the float64 result here, TF.js as close or closer).
A cut inside the base is refused with what to do instead, by `split` and the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from js_support import require_node  # noqa: E402

import splitkeras  # noqa: E402
from splitkeras.cli import main as cli_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tfjs_coverage as coverage  # noqa: E402
import tfjs_coverage_reference as reference_side  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BASE = "mobilenetv2_1.00_32"
TRAINABLE = 11  # the base's last layers that train: block_16 (expand, depthwise, project) and Conv_1
BATCH = 16


def calibrate(base: keras.Model, images: np.ndarray) -> None:
    """Moving statistics that fit the data, as a pretrained base's do: each BatchNorm's are its
    input's batch statistics over `images` (one training-mode pass with momentum 0). Statistics
    drawn at random instead leave the last blocks' channels nearly constant over a batch, where
    the trainable training-mode BatchNorms make the gradients unresolvable in float32 (Keras
    float32 off its float64 by ~1e2 at this size); calibrated: by <= 3e-5."""
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    base(images, training=True)
    for layer in norms:
        layer.momentum = 0.99


def transfer_model() -> keras.Model:
    keras.utils.set_random_seed(31)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
    assert base.name == BASE
    coverage.prepare(base, 31)  # gammas and betas drawn (none the identity)
    calibrate(base, np.random.default_rng(30).uniform(-1.0, 1.0, (32, 32, 32, 3)).astype(np.float32))
    for layer in base.layers[:-TRAINABLE]:
        layer.trainable = False
    image = keras.Input((32, 32, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(base(image))
    model = keras.Model(image, keras.layers.Dense(10, activation="softmax", name="classifier")(pooled),
                        name="transfer")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_the_base_exports_as_one_device_segment_and_trains_like_keras(tmp_path: Path) -> None:
    require_node()
    model = transfer_model()
    split = splitkeras.split(model, at=["pool"])
    split.save(tmp_path / "split", tfjs=True)
    manifest = json.loads((tmp_path / "split" / "split.json").read_text())
    assert [(s["name"], s["placement"], s.get("tfjs")) for s in manifest["segments"]] == \
        [("head", "device", "head_tfjs/model.json"), ("tail", "server", None)]
    head = split["head"].model
    assert [layer.name for layer in head.layers] == ["image", BASE, "pool"]
    bundle = tmp_path / "split" / "head_tfjs"
    topology = json.loads((bundle / "model.json").read_text())
    layers = topology["modelTopology"]["model_config"]["config"]["layers"]
    weights = [w["name"] for group in topology["weightsManifest"] for w in group["weights"]]
    assert len(weights) == len(head.weights) == 260
    assert all(name.startswith(f"{BASE}/") for name in weights)  # the nested model inlined
    assert f"{BASE}/block_16_project/kernel" in weights and f"{BASE}/Conv1/kernel" in weights
    assert len(layers) > 150 and not any(layer["class_name"] in ("Functional", "Model") for layer in layers)

    rng = np.random.default_rng(32)
    images = rng.uniform(-1.0, 1.0, (BATCH, 32, 32, 3)).astype(np.float32)  # as preprocess_input gives
    frozen = {v.path: np.asarray(v) for v in head.non_trainable_weights}
    reference = reference_side.keras_reference(head, [images], rng)
    for variable in head.non_trainable_weights:  # the exported statistics: the reference pass moved some
        variable.assign(frozen[variable.path])
    job = {"id": "transfer_head", "bundle_dir": str(bundle), "inputs": [coverage._encode(images)],
           "upstream": [coverage._encode(g) for g in reference["upstream"]], "return_weights": "non_trainable",
           "result_file": str(tmp_path / "result.json")}
    coverage._run_node([job], tmp_path, "transfer", timeout=240)
    result = json.loads((tmp_path / "result.json").read_text())
    figures = reference_side.compare(reference, result)
    # predict against float64 too: 154 layers of inference in float32 drift from the exact result
    # by ~2e-5 of the largest output in Keras itself (the error grows ~linearly with depth here)
    truth = np.asarray(reference_side.float64_twin(head)(images.astype(np.float64), training=False))
    scale = float(np.abs(truth).max())
    keras_own = float(np.abs(reference["predict"][0] - truth).max()) / scale
    tfjs_truth = float(np.abs(reference_side._decode(result["outputs"][0]) - truth).max()) / scale
    print(f"\nMobileNetV2 base (32x32, last {TRAINABLE} layers trainable) as one TF.js head, batch "
          f"{BATCH}: predict {figures['predict']:.1e} vs Keras float32, {tfjs_truth:.1e} vs float64 (Keras float32 "
          f"vs float64 {keras_own:.1e}); {figures['weights']} trainable weights, gradients "
          f"{figures['gradient_vs_keras']:.1e} vs Keras float32, {figures['gradient']:.1e} vs float64 "
          f"(Keras float32 vs float64 {figures['keras_float32_error']:.1e}); input gradient "
          f"{figures['input_gradient']:.1e}; moving statistics {figures['moving_statistics']:.1e}; "
          f"{figures['zero_gradient_weights']} zero gradients")
    assert figures["weights"] == len(head.trainable_weights) == 12  # 4 kernels, 4 gammas and betas
    # the sweep's rule where float32 cannot meet the floor: within it of Keras float32 or float64,
    # else within NOISE_MARGIN x Keras float32's own deviation from float64
    assert min(figures["predict"], tfjs_truth) <= max(coverage.FLOORS["predict"],
                                                     coverage.NOISE_MARGIN * keras_own)
    assert tfjs_truth <= max(coverage.FLOORS["predict"], 2 * keras_own)  # as exact as Keras, to 2x
    assert figures["weights_within_1e-4"] == figures["weights"] - figures["zero_gradient_weights"]
    assert figures["gradient"] <= coverage.FLOORS["gradient"]  # strictly, no float-noise allowance
    assert figures["input_gradient"] <= coverage.FLOORS["gradient"]
    assert figures["moving_statistics"] <= coverage.FLOORS["moving_statistics"]
    frozen_after = {name: ref for name, ref in reference["after"].items()}
    for variable in head.non_trainable_weights:  # Keras moved only the trainable BatchNorms
        moved = float(np.max(np.abs(frozen_after[_tfjs_name(head, variable)] - frozen[variable.path])))
        assert (moved > 0) == ("block_16" in variable.path or "Conv_1_bn" in variable.path), variable.path


def _tfjs_name(model: keras.Model, variable: keras.Variable) -> str:
    from converters.tfjs_config import tfjs_named_weights

    return next(name for name, v in tfjs_named_weights(model) if v is variable)


def test_a_cut_inside_the_base_is_refused_with_what_to_do(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = transfer_model()
    with pytest.raises(splitkeras.CutError, match=f"Layer 'block_2_add' is inside the nested model '{BASE}'"
                                                 f".*Cut at '{BASE}' or at a layer before it"):
        splitkeras.split(model, at=["block_2_add"])
    model.save(tmp_path / "transfer.keras")
    assert cli_main(["split", str(tmp_path / "transfer.keras"), "--at", "block_2_add",
                     "-o", str(tmp_path / "out")]) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "inside the nested model" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    split = splitkeras.split(model, at=[BASE])  # at the base itself: the whole base in the head
    assert [layer.name for layer in split["head"].model.layers] == ["image", BASE]
