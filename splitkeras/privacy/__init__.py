"""Privacy you can measure: what an honest-but-curious server can learn from the tensors
it receives, and the defences a device turns on against it.

* `scan_bodies` (`wire_audit`): search recorded HTTP bodies for the inputs and labels.
* Attacks (`attacks/`): label inference from gradients (`norm_attack`, `cosine_attack`,
  `cluster_attack`) and input reconstruction from activations (`reconstruct`).
* Defences (`defences/`): `MaxNorm` and `GradientNoise` (the gradients the device sends
  back), `ActivationNoise` (clipped Gaussian noise on sent activations, with
  `dp_epsilon`), `NoPeek` (distance correlation in the device loss), `RandomizedResponse`
  (label DP when the labels go to the server). Pass them as
  `DeviceClient(..., defences=[...])`.
* `ServerView` (`capture`): a runner wrapper that records what a server stage receives,
  and `audit` (`harness`): train a split in process with defences and attack it.

Example:
    >>> from splitkeras.privacy import MaxNorm, audit                       # doctest: +SKIP
    >>> report = audit(split, x, y, defences=[MaxNorm(seed=0)], epochs=5)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ActivationNoise", "Finding", "GradientNoise", "MaxNorm", "NoPeek", "RandomizedResponse",
           "ServerView", "audit", "dp_epsilon", "parse_defence", "scan_bodies", "train_in_process"]

if TYPE_CHECKING:
    from splitkeras.privacy.accounting import dp_epsilon
    from splitkeras.privacy.capture import ServerView
    from splitkeras.privacy.defences import ActivationNoise, GradientNoise, MaxNorm, NoPeek, RandomizedResponse
    from splitkeras.privacy.defences.spec import parse_defence
    from splitkeras.privacy.harness import audit, train_in_process
    from splitkeras.privacy.wire_audit import Finding, scan_bodies

_MODULES = {"scan_bodies": "splitkeras.privacy.wire_audit", "Finding": "splitkeras.privacy.wire_audit",
            "dp_epsilon": "splitkeras.privacy.accounting", "ServerView": "splitkeras.privacy.capture",
            "audit": "splitkeras.privacy.harness", "train_in_process": "splitkeras.privacy.harness",
            "parse_defence": "splitkeras.privacy.defences.spec",
            **{name: "splitkeras.privacy.defences" for name in
               ("ActivationNoise", "GradientNoise", "MaxNorm", "NoPeek", "RandomizedResponse")}}


def __getattr__(name: str) -> Any:
    """Import lazily: nothing here loads TensorFlow until it is used."""
    import importlib

    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'splitkeras.privacy' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
