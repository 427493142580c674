"""`ActivationNoise`: clipped Gaussian noise on the activations the device sends to the server.

Each sample's activation -- every float tensor sent to the server stage, concatenated -- is
clipped to L2 norm `clip` (`C`) and `N(0, sigma^2 C^2)` is added to each coordinate; the
server trains on the noisy activation. The device differentiates through the clipping
exactly (the gradient that comes back is for the noisy activation, the noise being
additive; the clip's Jacobian `c (I - a a^T / ||a||^2)`, `c = C / ||a||`, is applied for a
clipped sample). Epsilon for a delta: `splitkeras.privacy.dp_epsilon` (mechanism and
what it covers are stated there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.errors import TrainingError
from splitkeras.privacy.defences.base import Defence, RunnerWrapper, is_float, per_sample_norms

__all__ = ["ActivationNoise"]


class ActivationNoise(Defence):
    """Clip each sample's sent activation to norm `clip`, add `N(0, (sigma * clip)^2)`.

    Args:
        clip: the L2 bound `C` per sample (None: no clipping, and then no DP guarantee;
            `sigma` is then the noise's standard deviation itself).
        sigma: the noise multiplier (0 with `clip=None`: off, bitwise).
        seed: of the noise (NumPy's PCG64).

    Example:
        >>> client = DeviceClient("out", url, defences=[ActivationNoise(clip=1.0, sigma=0.5, seed=0)])  # doctest: +SKIP
        >>> dp_epsilon(0.5, 1e-5, epochs=5)  # doctest: +SKIP
    """

    def __init__(self, clip: float | None = 1.0, sigma: float = 1.0, seed: int | None = None) -> None:
        if clip is not None and not clip > 0:
            raise TrainingError(f"ActivationNoise(clip=) must be > 0 (or None), got {clip}.")
        if not sigma >= 0:
            raise TrainingError(f"ActivationNoise(sigma=) must be >= 0, got {sigma}.")
        self.clip, self.sigma, self.seed = clip, float(sigma), seed
        self.random = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"ActivationNoise(clip={self.clip}, sigma={self.sigma}, seed={self.seed})"

    @property
    def off(self) -> bool:
        return self.clip is None and self.sigma == 0

    def wrap(self, runner: Any, mode: str, model_inputs: Sequence[str]) -> Any:
        return runner if self.off else _Noised(runner, self)

    def perturb(self, inputs: Sequence[Any]) -> tuple[list[Any], np.ndarray | None]:
        """(the noisy inputs, each sample's clip factor or None when nothing was clipped)."""
        floats = [np.asarray(v, np.float32) for v in inputs if is_float(v)]
        if not floats:
            return list(inputs), None
        factors = None
        if self.clip is not None:
            norms = per_sample_norms(floats)
            with np.errstate(divide="ignore"):
                factors = np.where(norms > self.clip, self.clip / norms, 1.0)
        std = self.sigma * (self.clip if self.clip is not None else 1.0)
        out = []
        for value in inputs:
            if not is_float(value):
                out.append(value)
                continue
            array = np.asarray(value, np.float32)
            if factors is not None:
                array = (array * factors.reshape((-1,) + (1,) * (array.ndim - 1))).astype(np.float32)
            if std > 0:
                array = (array + std * self.random.standard_normal(array.shape)).astype(np.float32)
            out.append(array)
        return out, factors

    @staticmethod
    def clip_vjp(inputs: Sequence[Any], factors: np.ndarray | None, grads: Sequence[Any]) -> list[Any]:
        """The gradients of the unclipped activations from those of the clipped ones."""
        if factors is None or np.all(factors == 1.0):
            return list(grads)
        pairs = [(np.asarray(a, np.float64), np.asarray(g, np.float64))
                 for a, g in zip(inputs, grads) if g is not None and is_float(a)]
        batch = len(factors)
        dot = sum(np.sum((a * g).reshape(batch, -1), axis=1) for a, g in pairs)
        squares = per_sample_norms([a for a, _ in pairs]) ** 2
        clipped = factors < 1.0
        out = []
        for a, g in zip(inputs, grads):
            if g is None or not is_float(a):
                out.append(g)
                continue
            a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
            shape = (-1,) + (1,) * (a64.ndim - 1)
            projected = factors.reshape(shape) * (g64 - a64 * (dot / np.where(clipped, squares, 1.0)).reshape(shape))
            out.append(np.where(clipped.reshape(shape), projected, g64).astype(np.float32))
        return out


class _Noised(RunnerWrapper):
    def __init__(self, inner: Any, defence: ActivationNoise) -> None:
        super().__init__(inner)
        self.defence = defence
        self._sent: dict[Any, tuple[list[Any], np.ndarray | None]] = {}

    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]:
        noisy, factors = self.defence.perturb(inputs)
        outputs = list(self.inner.forward(step, noisy))
        self._sent[step] = (list(inputs), factors)
        return outputs

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]:
        grads = list(self.inner.backward(step, output_gradients))
        inputs, factors = self._sent.pop(step)
        return ActivationNoise.clip_vjp(inputs, factors, grads)

    def train_step(self, step: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        noisy, factors = self.defence.perturb(inputs)
        grads, logs = self.inner.train_step(step, noisy, y, sample_weight, other_losses)
        return ActivationNoise.clip_vjp(inputs, factors, grads), logs

    def drop(self, step: Any) -> None:
        self._sent.pop(step, None)
        self.inner.drop(step)
