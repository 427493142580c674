"""`NoPeek` (Vepakomma et al. 2020, arXiv 2008.09161): the distance correlation between a
batch's inputs and the activations sent to the server, times `alpha`, added to the device's
loss, so that the head learns activations from which the inputs are hard to recover.

The device trains on `loss + alpha * dCor(x, a)`: the gradient of `alpha * dCor` with
respect to the sent activation `a` is added to the gradient the server sends back for
`a`, and the head's exact vector-Jacobian product does the rest, so the head's weights
get the gradient of the whole sum. `dCor` is the sample distance correlation of the batch
(each sample flattened; every float tensor sent, concatenated): `dCov(x, a) /
sqrt(dCov(x, x) dCov(a, a))` from double-centred Euclidean distance matrices. The
reported loss stays the task's loss; `last_dcor` keeps each step's value (the last
`KEPT_DCOR` steps').
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from splitkeras.errors import TrainingError
from splitkeras.privacy.defences.base import Defence, RunnerWrapper, is_float

__all__ = ["NoPeek", "distance_correlation"]

KEPT_DCOR = 10_000  # the steps whose distance correlation `last_dcor` keeps (bounded memory)


def _centred_distances(x: tf.Tensor) -> tf.Tensor:
    squares = tf.reduce_sum(tf.square(x[:, None, :] - x[None, :, :]), axis=-1)
    distances = tf.sqrt(squares + 1e-12)  # smooth at 0 (the diagonal): its gradient is 0 there
    return (distances - tf.reduce_mean(distances, 0, keepdims=True)
            - tf.reduce_mean(distances, 1, keepdims=True) + tf.reduce_mean(distances))


def distance_correlation(x: Any, a: Any) -> tf.Tensor:
    """The sample distance correlation (in [0, 1]) of two batches `[batch, ...]`, float64.

    Example:
        >>> x = np.random.default_rng(0).standard_normal((16, 4))
        >>> round(float(distance_correlation(x, 2 * x)), 6)
        1.0
    """
    x = tf.reshape(tf.cast(x, tf.float64), [tf.shape(x)[0], -1])
    a = tf.reshape(tf.cast(a, tf.float64), [tf.shape(a)[0], -1])
    cx, ca = _centred_distances(x), _centred_distances(a)
    covariance = tf.reduce_mean(cx * ca)
    variance = tf.sqrt(tf.reduce_mean(cx * cx) * tf.reduce_mean(ca * ca))
    return tf.sqrt(tf.maximum(covariance, 0.0) / (variance + 1e-18) + 1e-18)


class NoPeek(Defence):
    """Add `alpha * dCor(inputs, sent activations)` to the device's loss.

    Args:
        alpha: the weight (0: off, bitwise).

    Example:
        >>> client = DeviceClient("out", url, defences=[NoPeek(alpha=0.5)])   # doctest: +SKIP
    """

    outermost = True

    def __init__(self, alpha: float = 0.1) -> None:
        if not alpha >= 0:
            raise TrainingError(f"NoPeek(alpha=) must be >= 0, got {alpha}.")
        self.alpha = float(alpha)
        self.last_dcor: deque[float] = deque(maxlen=KEPT_DCOR)

    def __repr__(self) -> str:
        return f"NoPeek(alpha={self.alpha})"

    def wrap(self, runner: Any, mode: str, model_inputs: Sequence[str]) -> Any:
        return runner if self.alpha == 0 else _NoPeeked(runner, self, model_inputs)

    def gradients(self, x: Sequence[Any], sent: Sequence[Any]) -> list[Any]:
        """`d(alpha * dCor(x, sent)) / d(sent)`, one per sent tensor (None for non-float ones)."""
        floats = [tf.constant(np.asarray(v, np.float64)) for v in sent if is_float(v)]
        batch = int(floats[0].shape[0])
        inputs = tf.concat([tf.reshape(tf.cast(np.asarray(v), tf.float64), [batch, -1]) for v in x], 1)
        with tf.GradientTape() as tape:
            tape.watch(floats)
            dcor = distance_correlation(inputs, tf.concat([tf.reshape(f, [batch, -1]) for f in floats], 1))
        self.last_dcor.append(float(dcor))
        grads = iter(tape.gradient(dcor, floats))
        return [(self.alpha * next(grads)).numpy().astype(np.float32) if is_float(v) else None for v in sent]


class _NoPeeked(RunnerWrapper):
    """Reads the model inputs too (as extra inputs of the loop; they get no gradient)."""

    def __init__(self, inner: Any, defence: NoPeek, model_inputs: Sequence[str]) -> None:
        super().__init__(inner)
        self.defence = defence
        self.sent = len(inner.input_names)
        self.model_inputs = [n for n in model_inputs if n not in inner.input_names]
        if not self.model_inputs:
            raise TrainingError("NoPeek needs the model's inputs on the device, but the server stage "
                                "reads them all itself.")
        self.input_names = [*inner.input_names, *self.model_inputs]
        self._kept: dict[Any, tuple[list[Any], list[Any]]] = {}

    def _add(self, grads: Sequence[Any], extra: Sequence[Any]) -> list[Any]:
        summed = [e if g is None else (g if e is None else np.asarray(g, np.float32) + e)
                  for g, e in zip(grads, extra)]
        return summed + [None] * len(self.model_inputs)

    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]:
        sent, x = list(inputs[:self.sent]), list(inputs[self.sent:])
        outputs = list(self.inner.forward(step, sent))
        self._kept[step] = (sent, x)
        return outputs

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]:
        grads = list(self.inner.backward(step, output_gradients))
        sent, x = self._kept.pop(step)
        return self._add(grads, self.defence.gradients(x, sent))

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        sent, x = list(inputs[:self.sent]), list(inputs[self.sent:])
        grads, logs = self.inner.train_step(step, sent, y, sample_weight, other_losses)
        return self._add(list(grads), self.defence.gradients(x, sent)), logs

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        return self.inner.predict_with_regularization(list(inputs[:self.sent]))

    def drop(self, step: Any) -> None:
        self._kept.pop(step, None)
        self.inner.drop(step)
