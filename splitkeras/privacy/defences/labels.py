"""`RandomizedResponse`: label differential privacy for a split whose labels go to the server.

Each label is sent as itself with probability `e^eps / (e^eps + K - 1)` and as each of the
`K - 1` other classes with probability `1 / (e^eps + K - 1)` (K-ary randomized response,
epsilon-label-DP per release; `K` from the model output: its last dimension, 2 for a
one-unit output). Labels are class ids (`[batch]` or `[batch, 1]`), one-hot rows, or 0/1
for a one-unit (sigmoid) output. Drawn afresh at every step: a sample sent in `E` epochs
is released `E` times (`E * eps` by basic composition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.errors import TrainingError
from splitkeras.privacy.defences.base import Defence, RunnerWrapper

__all__ = ["RandomizedResponse"]


class RandomizedResponse(Defence):
    """K-ary randomized response on the labels sent to the server.

    Args:
        epsilon: the label-DP epsilon of one release (`math.inf`: off, bitwise).
        seed: of the draws (NumPy's PCG64).

    Example:
        >>> client = DeviceClient("out", url, defences=[RandomizedResponse(epsilon=2.0, seed=0)])  # doctest: +SKIP
    """

    modes = ("labels_on_server",)
    protects = "the labels sent to the server"
    instead = "In a U-shaped split the labels stay on the device; against label inference from " \
              "gradients use MaxNorm or GradientNoise."

    def __init__(self, epsilon: float, seed: int | None = None) -> None:
        if not epsilon > 0:
            raise TrainingError(f"RandomizedResponse(epsilon=) must be > 0, got {epsilon}.")
        self.epsilon, self.seed = float(epsilon), seed
        self.random = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"RandomizedResponse(epsilon={self.epsilon}, seed={self.seed})"

    def keep_probability(self, classes: int) -> float:
        if math.isinf(self.epsilon):
            return 1.0
        return math.exp(self.epsilon) / (math.exp(self.epsilon) + classes - 1)

    def wrap(self, runner: Any, mode: str, model_inputs: Sequence[str]) -> Any:
        return runner if math.isinf(self.epsilon) else _Randomized(runner, self)

    def flip(self, y: Any, classes: int) -> np.ndarray:
        """Randomized response on class ids `[batch]` / `[batch, 1]` or one-hot `[batch, K]`."""
        y = np.asarray(y)
        one_hot = y.ndim == 2 and y.shape[1] == classes and classes > 1
        if one_hot:
            ids = np.argmax(y, axis=1).astype(np.int64)
        else:
            flat = y.reshape(len(y))
            ids = np.rint(flat).astype(np.int64)
            if not np.array_equal(ids, flat):
                ids = np.full(len(y), -1)
        if len(ids) and (ids.min() < 0 or ids.max() >= classes):
            raise TrainingError(f"RandomizedResponse needs class ids in [0, {classes}) or one-hot rows; "
                                f"got labels of shape {list(y.shape)} and dtype {y.dtype}.")
        keep = self.random.random(len(ids)) < self.keep_probability(classes)
        other = (ids + self.random.integers(1, classes, len(ids))) % classes  # uniform over the others
        flipped = np.where(keep, ids, other)
        if one_hot:
            return np.eye(classes, dtype=y.dtype)[flipped]
        return flipped.astype(y.dtype).reshape(y.shape)


class _Randomized(RunnerWrapper):
    def __init__(self, inner: Any, defence: RandomizedResponse) -> None:
        super().__init__(inner)
        self.defence = defence
        self.classes = _classes(inner)

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        if isinstance(y, (dict, list, tuple)):
            raise TrainingError("RandomizedResponse works on one output's labels (one array).")
        grads, logs = self.inner.train_step(step, inputs, self.defence.flip(y, self.classes),
                                            sample_weight, other_losses)
        return list(grads), logs


def _innermost(runner: Any, attribute: str) -> Any:
    while runner is not None:
        value = getattr(runner, attribute, None)
        if value:
            return value
        runner = getattr(runner, "inner", None)
    return None


def _classes(runner: Any) -> int:
    """K from the model output the labels are for: the remote's label specs, or the model."""
    specs = _innermost(runner, "label_specs")
    model = _innermost(runner, "model")
    shape = specs[0].shape if specs else (model.outputs[0].shape if model is not None else None)
    if shape is None or shape[-1] is None:
        raise TrainingError("RandomizedResponse could not read the number of classes from the model output.")
    return max(int(shape[-1]), 2)
