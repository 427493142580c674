"""Differential-privacy accounting for `ActivationNoise`, with Google's `dp-accounting`
(RDP accountant), imported only when asked for (`pip install 'splitkeras[privacy]'`).

The mechanism: each sample's activation (every float tensor the device sends to the
server, concatenated) is clipped to L2 norm `C`, then `N(0, sigma^2 C^2)` is added to every
coordinate: a Gaussian mechanism with noise multiplier `sigma` for add/remove-one-sample
adjacency (sensitivity `C`). A sample is released once per epoch.

* `sampling="shuffle"` (what `fit(shuffle=True)` does: every sample in exactly one batch
  per epoch): `epochs` Gaussian releases composed, no amplification by sampling.
* `sampling="poisson"`: batches drawn by Poisson sampling at rate `batch_size / samples`,
  `epochs * ceil(samples / batch_size)` sampled steps composed (the DP-SGD account; only
  valid if batches really are Poisson-sampled, which `fit` does not do).

What it covers: what the server learns about one sample from *that sample's* released
activations, the device's weights treated as public. The head is trained on clean inputs
(and the tail on the labels), so later activations of other samples may carry information
about a sample through the head's weights: this is not a DP guarantee for the training run.
"""

from __future__ import annotations

import math
from typing import Any

from splitkeras.errors import SplitKerasError

__all__ = ["dp_epsilon", "SAMPLINGS"]

SAMPLINGS = ("shuffle", "poisson")


def _accounting() -> Any:
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:  # pragma: no cover - depends on the environment
        raise SplitKerasError("DP accounting needs the dp-accounting package: pip install "
                              "'splitkeras[privacy]'") from None
    return dp_accounting, rdp


def dp_epsilon(sigma: float, delta: float, *, epochs: int, samples: int | None = None,
               batch_size: int | None = None, sampling: str = "shuffle") -> float:
    """Epsilon of `ActivationNoise(clip=C, sigma=sigma)` for `delta` (see the module docstring).

    Example:
        >>> round(dp_epsilon(1.0, 1e-5, epochs=10), 2)
        19.05
    """
    if not sigma > 0:
        raise SplitKerasError(f"sigma must be > 0 for a finite epsilon, got {sigma}.")
    if not 0 < delta < 1:
        raise SplitKerasError(f"delta must be in (0, 1), got {delta}.")
    if epochs < 1:
        raise SplitKerasError(f"epochs must be >= 1, got {epochs}.")
    if sampling not in SAMPLINGS:
        raise SplitKerasError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}.")
    dp_accounting, rdp = _accounting()
    event = dp_accounting.GaussianDpEvent(sigma)
    if sampling == "shuffle":
        composed = dp_accounting.SelfComposedDpEvent(event, epochs)
    else:
        if not samples or not batch_size or not 0 < batch_size <= samples:
            raise SplitKerasError("sampling='poisson' needs samples and batch_size "
                                  f"(0 < batch_size <= samples), got {samples} and {batch_size}.")
        steps = epochs * math.ceil(samples / batch_size)
        composed = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(batch_size / samples, event), steps)
    accountant = rdp.RdpAccountant()
    accountant.compose(composed)
    return float(accountant.get_epsilon(delta))
