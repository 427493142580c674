"""Unit tests of `splitkeras.privacy`: the attacks' scores, each defence's mechanism (exact
where it is deterministic, statistics where it draws noise), the DP accountant against
independent bounds, and short in-process audits showing the attacks and defences work."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import splitkeras
from splitkeras.errors import SplitKerasError, TrainingError
from splitkeras.privacy.accounting import dp_epsilon
from splitkeras.privacy.attacks import auc, binary_attacks, cluster_attack, cosine_attack, norm_attack
from splitkeras.privacy.defences import (
    ActivationNoise,
    GradientNoise,
    MaxNorm,
    NoPeek,
    RandomizedResponse,
    apply_defences,
    distance_correlation,
)
from splitkeras.privacy.harness import audit, train_in_process

RNG = np.random.default_rng(0)


# ---- attacks ------------------------------------------------------------------------------------
def test_auc_counts_pairs_and_ties() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 2], [True, True])


def _binary_gradients(labels: np.ndarray) -> np.ndarray:
    """`(p - y) w` plus a little noise: what a one-logit tail sends back."""
    w = RNG.standard_normal(8)
    p = np.where(labels == 1, 0.2, 0.1)  # the model leans to class 0
    return (p - labels)[:, None] * w[None, :] + 1e-3 * RNG.standard_normal((len(labels), 8))


def test_norm_and_cosine_attacks_recover_binary_labels() -> None:
    labels = [(RNG.random(32) < 0.3).astype(int) for _ in range(5)]
    grads = [_binary_gradients(y) for y in labels]
    assert auc(norm_attack(grads[0]), labels[0] == 1) == 1.0
    assert auc(cosine_attack(grads[0]), labels[0] == 1) == 1.0
    report = binary_attacks(grads, labels, positive=1)
    assert report == {"norm_auc": 1.0, "cosine_auc": 1.0, "label_auc": 1.0}
    shuffled = binary_attacks(grads, [RNG.permutation(y) for y in labels], positive=1)
    assert shuffled["label_auc"] < 0.8  # no signal, no score


def test_cluster_attack_recovers_classes_and_reports_chance() -> None:
    labels = RNG.integers(0, 4, 400)
    centres = RNG.standard_normal((4, 16))
    grads = centres[labels] + 0.05 * RNG.standard_normal((400, 16))
    report = cluster_attack(grads, labels, 4)
    assert report["recovery_accuracy"] == 1.0 and report["chance"] < 0.4
    assert cluster_attack(RNG.standard_normal((400, 16)), labels, 4)["recovery_accuracy"] < 0.45


# ---- gradient defences --------------------------------------------------------------------------
def test_max_norm_matches_the_largest_expected_squared_norm_along_the_gradient() -> None:
    g = RNG.standard_normal((6, 5)).astype(np.float32) * np.array([[1], [2], [3], [0.5], [4], [0]], np.float32)
    defence = MaxNorm(seed=1)
    draws = np.stack([defence.perturb([g])[0] for _ in range(20000)])  # [draws, 6, 5]
    largest = np.max(np.sum(g.astype(np.float64) ** 2, 1))
    mean_square = np.mean(np.sum(draws.astype(np.float64) ** 2, axis=2), axis=0)
    assert np.allclose(mean_square[:5], largest, rtol=0.03), (mean_square, largest)
    assert np.all(draws[:, 5] == 0)  # a zero gradient stays zero
    top = int(np.argmax(np.sum(g.astype(np.float64) ** 2, 1)))
    assert np.array_equal(draws[:, top], np.broadcast_to(g[top], draws[:, top].shape))  # the largest: as is
    unit = g[:5] / np.linalg.norm(g[:5], axis=1, keepdims=True)
    cosine = np.abs(np.sum(draws[:, :5] * unit, -1)) / np.linalg.norm(draws[:, :5], axis=-1)
    assert np.allclose(cosine, 1.0, atol=1e-5)  # only along the gradient
    again = MaxNorm(seed=1)
    assert np.array_equal(again.perturb([g])[0], draws[0])
    assert np.array_equal(MaxNorm(strength=0.0).perturb([g])[0], g)


def test_gradient_noise_has_the_stated_norm() -> None:
    g = RNG.standard_normal((32, 50)).astype(np.float32)
    noisy = GradientNoise(scale=2.0, seed=3).perturb([g])[0]
    largest = np.max(np.linalg.norm(g.astype(np.float64), axis=1))
    noise = np.linalg.norm((noisy - g).astype(np.float64), axis=1)
    assert abs(np.mean(noise) / (2.0 * largest) - 1) < 0.05


def test_gradient_defences_refuse_a_labels_on_server_split() -> None:
    with pytest.raises(TrainingError, match="MaxNorm protects the labels through the gradients .* "
                                            "use RandomizedResponse"):
        apply_defences([object()], ["server"], ["labels_on_server"], [MaxNorm()], [])
    with pytest.raises(TrainingError, match="RandomizedResponse protects the labels sent .* MaxNorm"):
        apply_defences([object()], ["server"], ["u_shaped"], [RandomizedResponse(1.0)], [])
    with pytest.raises(TrainingError, match="defences= takes splitkeras.privacy defences"):
        apply_defences([object()], ["server"], ["u_shaped"], ["max_norm"], [])  # type: ignore[list-item]


# ---- activation noise and its accountant --------------------------------------------------------
def test_activation_noise_clips_each_sample_over_all_tensors_then_adds_sigma_c() -> None:
    a, b = RNG.standard_normal((400, 3)).astype(np.float32), RNG.standard_normal((400, 2, 2)).astype(np.float32)
    (ca, cb), factors = ActivationNoise(clip=1.5, sigma=0.0).perturb([a, b])
    norms = np.sqrt(np.sum(ca.astype(np.float64) ** 2, 1) + np.sum(cb.astype(np.float64) ** 2, (1, 2)))
    original = np.sqrt(np.sum(a.astype(np.float64) ** 2, 1) + np.sum(b.astype(np.float64) ** 2, (1, 2)))
    assert np.allclose(norms, np.minimum(original, 1.5), rtol=1e-6)
    assert factors is not None and np.all(factors <= 1)
    (na, nb), _ = ActivationNoise(clip=1.5, sigma=0.8, seed=4).perturb([a, b])
    assert abs(np.std(np.concatenate([(na - ca).ravel(), (nb - cb).ravel()])) / (0.8 * 1.5) - 1) < 0.03
    (sa, _), _ = ActivationNoise(clip=1.5, sigma=0.8, seed=4).perturb([a, b])
    assert np.array_equal(sa, na)  # the same seed, the same noise


def test_activation_clipping_is_differentiated_exactly() -> None:
    a, b = RNG.standard_normal((6, 3)), RNG.standard_normal((6, 2))
    a[:2] *= 0.1  # two samples inside the bound
    b[:2] *= 0.1
    ga, gb = RNG.standard_normal((6, 3)), RNG.standard_normal((6, 2))
    _, factors = ActivationNoise(clip=1.0, sigma=0.0).perturb([a.astype(np.float32), b.astype(np.float32)])
    mine = ActivationNoise.clip_vjp([a, b], factors, [ga, gb])
    ta, tb = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([ta, tb])
        norm = tf.sqrt(tf.reduce_sum(ta ** 2, 1) + tf.reduce_sum(tb ** 2, 1))
        factor = tf.minimum(1.0, 1.0 / norm)[:, None]
        clipped = [ta * factor, tb * factor]
    expected = tape.gradient(clipped, [ta, tb], output_gradients=[tf.constant(ga), tf.constant(gb)])
    assert 0 < np.sum(factors < 1) < 6  # some clipped, some not
    for got, want in zip(mine, expected):
        assert np.max(np.abs(got - want.numpy())) < 1e-6


def test_dp_epsilon_lies_between_the_tight_and_the_classic_bound() -> None:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    for sigma, epochs in ((1.0, 10), (4.0, 20)):
        epsilon = dp_epsilon(sigma, 1e-5, epochs=epochs)
        classic = min(epochs * alpha / (2 * sigma ** 2) + math.log(1e5) / (alpha - 1)
                      for alpha in np.linspace(1.01, 200, 20000))
        pld = pld_privacy_accountant.PLDAccountant()
        pld.compose(dp_accounting.GaussianDpEvent(sigma), epochs)
        assert pld.get_epsilon(1e-5) <= epsilon <= classic, (pld.get_epsilon(1e-5), epsilon, classic)
    assert dp_epsilon(1.0, 1e-5, epochs=10, samples=1000, batch_size=32, sampling="poisson") < \
        dp_epsilon(1.0, 1e-5, epochs=10)
    with pytest.raises(SplitKerasError, match="sampling='poisson' needs samples and batch_size"):
        dp_epsilon(1.0, 1e-5, epochs=1, sampling="poisson")
    with pytest.raises(SplitKerasError, match="sigma must be > 0"):
        dp_epsilon(0.0, 1e-5, epochs=1)


# ---- NoPeek and randomized response -------------------------------------------------------------
def test_distance_correlation() -> None:
    x = RNG.standard_normal((64, 5))
    assert abs(float(distance_correlation(x, 3 * x + 1)) - 1) < 1e-9
    assert float(distance_correlation(x, RNG.standard_normal((64, 5)))) < 0.5
    assert float(distance_correlation(x, np.tanh(x[:, :2]))) > 0.6


def test_nopeek_gradient_is_alpha_times_the_distance_correlation_gradient() -> None:
    x, a = RNG.standard_normal((16, 4)), RNG.standard_normal((16, 3)).astype(np.float32)
    (grad,) = NoPeek(alpha=0.5).gradients([x], [a])
    step = 1e-6
    numeric = np.zeros_like(a, np.float64)
    for i, j in [(0, 0), (3, 2), (15, 1)]:
        up, down = a.astype(np.float64).copy(), a.astype(np.float64).copy()
        up[i, j] += step
        down[i, j] -= step
        numeric[i, j] = 0.5 * (float(distance_correlation(x, up)) - float(distance_correlation(x, down))) / (2 * step)
        assert abs(grad[i, j] - numeric[i, j]) < 1e-5


def test_randomized_response_keeps_each_label_with_the_stated_probability() -> None:
    defence = RandomizedResponse(epsilon=1.0, seed=2)
    y = RNG.integers(0, 5, 50000)
    flipped = defence.flip(y, 5)
    keep = math.e / (math.e + 4)
    assert abs(np.mean(flipped == y) - keep) < 0.01
    others = flipped[flipped != y] - y[flipped != y]
    assert set(np.unique(others % 5)) == {1, 2, 3, 4}  # uniform over the other classes
    assert np.allclose(np.bincount(others % 5)[1:] / len(others), 0.25, atol=0.01)
    one_hot = np.eye(5, dtype=np.float32)[y[:100]]
    assert defence.flip(one_hot, 5).shape == (100, 5)
    assert np.array_equal(RandomizedResponse(1.0, seed=2).flip(y, 5), flipped)
    with pytest.raises(TrainingError, match=r"class ids in \[0, 5\)"):
        defence.flip(np.array([0, 7]), 5)


# ---- short audits -------------------------------------------------------------------------------
def _cancer() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    order = np.random.default_rng(0).permutation(len(data.target))
    x, y = data.data[order].astype("float32"), data.target[order].astype("int64")
    x = (x - x[:400].mean(0)) / (x[:400].std(0) + 1e-6)
    return x[:400], y[:400], x[400:], y[400:]


def _cancer_split() -> splitkeras.Split:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((30,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="head")(inputs)
    h = keras.layers.Dense(16, activation="relu", name="mid_1")(h)
    h = keras.layers.Dense(8, activation="relu", name="mid_2")(h)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(h)
    return splitkeras.split(keras.Model(inputs, outputs), at=["head", "mid_2"])


@pytest.mark.parametrize("defences,bound", [([], None), ([MaxNorm(seed=0)], 0.65)])
def test_the_label_attack_works_and_max_norm_blunts_it(defences: list, bound: float | None) -> None:
    x, y, xt, yt = _cancer()
    run = train_in_process(_cancer_split(), x, y, defences=defences, optimizer=keras.optimizers.Adam(1e-2),
                           loss="binary_crossentropy", epochs=3, batch_size=16)
    report = audit(run, xt, yt, y_train=y)
    assert report["test_accuracy"] > 0.9
    if bound is None:
        assert report["labels"]["label_auc"] >= 0.9, report
    else:
        assert report["labels"]["label_auc"] <= bound, report


def test_nopeek_keeps_a_bounded_history_of_its_distance_correlations(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitkeras.privacy.defences import nopeek

    monkeypatch.setattr(nopeek, "KEPT_DCOR", 3)
    defence = nopeek.NoPeek(alpha=0.5)
    for value in range(5):
        defence.last_dcor.append(float(value))
    assert list(defence.last_dcor) == [2.0, 3.0, 4.0]
