"""Defences against label inference in a U-shaped split: perturb the gradients the device's
tail sends back to the server (the gradients of the server's outputs).

* `MaxNorm` (Li et al. 2022, "Label Leakage and Protection in Two-party Split Learning",
  the max-norm heuristic): each sample's gradient `g_j` becomes `g_j * (1 + sigma_j xi_j)`,
  `xi_j ~ N(0, 1)`, `sigma_j = sqrt(max_k ||g_k||^2 / ||g_j||^2 - 1)`, so every perturbed
  gradient's expected squared norm is the batch's largest (noise along the gradient
  direction only; a zero gradient stays zero). `strength` scales `sigma_j`.
* `GradientNoise`: isotropic Gaussian noise `N(0, (scale * max_k ||g_k||)^2 / d * I)` added
  to each sample's gradient (`d`: its size), i.e. a noise of norm about
  `scale * max_k ||g_k||`, which hides the direction too.

The server trains on the perturbed gradients and sends back input gradients computed from
them, so the head learns from them too: that is the accuracy cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splitkeras.errors import TrainingError
from splitkeras.privacy.defences.base import Defence, RunnerWrapper, per_sample_norms

__all__ = ["MaxNorm", "GradientNoise"]

_INSTEAD = "With the labels on the server, use RandomizedResponse (label DP)."


class _Perturbed(RunnerWrapper):
    def __init__(self, inner: Any, perturb: Any) -> None:
        super().__init__(inner)
        self._perturb = perturb

    def backward(self, step: Any, output_gradients: Sequence[Any]) -> list[Any]:
        return list(self.inner.backward(step, self._perturb(output_gradients)))


class _GradientDefence(Defence):
    modes = ("u_shaped",)
    protects = "the labels through the gradients the device sends back"
    instead = _INSTEAD

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.random = np.random.default_rng(seed)

    def wrap(self, runner: Any, mode: str, model_inputs: Sequence[str]) -> Any:
        return _Perturbed(runner, self.perturb)

    def perturb(self, gradients: Sequence[Any]) -> list[Any]:
        present = [np.asarray(g, np.float32) for g in gradients if g is not None]
        if not present:
            return list(gradients)
        noisy = iter(self._noisy(present))
        return [None if g is None else next(noisy) for g in gradients]

    def _noisy(self, gradients: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class MaxNorm(_GradientDefence):
    """The max-norm heuristic of Li et al. 2022 on the gradients sent to the server.

    Args:
        strength: scales every `sigma_j` (1: the paper's heuristic; 0: off, bitwise).
        seed: of the noise (NumPy's PCG64); the same seed gives the same noise.

    Example:
        >>> client = DeviceClient("out", url, defences=[MaxNorm(seed=0)])   # doctest: +SKIP
    """

    def __init__(self, strength: float = 1.0, seed: int | None = None) -> None:
        if not strength >= 0:
            raise TrainingError(f"MaxNorm(strength=) must be >= 0, got {strength}.")
        super().__init__(seed)
        self.strength = float(strength)

    def __repr__(self) -> str:
        return f"MaxNorm(strength={self.strength}, seed={self.seed})"

    def _noisy(self, gradients: list[np.ndarray]) -> list[np.ndarray]:
        if self.strength == 0:
            return gradients
        norms = per_sample_norms(gradients)
        largest = norms.max()
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(norms > 0, np.sqrt(np.maximum(largest ** 2 / norms ** 2 - 1.0, 0.0)), 0.0)
        factor = 1.0 + self.strength * sigma * self.random.standard_normal(len(norms))
        return [(g * factor.reshape((-1,) + (1,) * (g.ndim - 1))).astype(np.float32) for g in gradients]


class GradientNoise(_GradientDefence):
    """Isotropic Gaussian noise on each sample's gradient, scaled by the batch's largest
    per-sample gradient norm.

    Args:
        scale: noise norm relative to the largest per-sample gradient norm (0: off, bitwise).
        seed: of the noise.
    """

    def __init__(self, scale: float = 1.0, seed: int | None = None) -> None:
        if not scale >= 0:
            raise TrainingError(f"GradientNoise(scale=) must be >= 0, got {scale}.")
        super().__init__(seed)
        self.scale = float(scale)

    def __repr__(self) -> str:
        return f"GradientNoise(scale={self.scale}, seed={self.seed})"

    def _noisy(self, gradients: list[np.ndarray]) -> list[np.ndarray]:
        if self.scale == 0:
            return gradients
        largest = per_sample_norms(gradients).max()
        size = sum(int(np.prod(g.shape[1:])) for g in gradients)
        std = self.scale * largest / np.sqrt(size)
        return [(g + std * self.random.standard_normal(g.shape)).astype(np.float32) for g in gradients]
