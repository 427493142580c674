"""Defences from short text specs, as the command line takes them (`--defence SPEC`).

| spec | defence |
|---|---|
| `max-norm[:STRENGTH]` | `MaxNorm(STRENGTH)` (default 1) |
| `gradient-noise:SCALE` | `GradientNoise(SCALE)` |
| `activation-noise:CLIP,SIGMA` | `ActivationNoise(CLIP, SIGMA)` |
| `nopeek:ALPHA` | `NoPeek(ALPHA)` |
| `randomized-response:EPSILON` | `RandomizedResponse(EPSILON)` |

Example:
    >>> parse_defence("activation-noise:1.0,0.5", seed=0)
    ActivationNoise(clip=1.0, sigma=0.5, seed=0)
"""

from __future__ import annotations

from typing import Any

from splitkeras.errors import TrainingError
from splitkeras.privacy.defences.activations import ActivationNoise
from splitkeras.privacy.defences.base import Defence
from splitkeras.privacy.defences.gradients import GradientNoise, MaxNorm
from splitkeras.privacy.defences.labels import RandomizedResponse
from splitkeras.privacy.defences.nopeek import NoPeek

__all__ = ["parse_defence", "SPECS"]

SPECS = {"max-norm": (MaxNorm, 1, "[:STRENGTH]"), "gradient-noise": (GradientNoise, 1, ":SCALE"),
         "activation-noise": (ActivationNoise, 2, ":CLIP,SIGMA"), "nopeek": (NoPeek, 1, ":ALPHA"),
         "randomized-response": (RandomizedResponse, 1, ":EPSILON")}


def parse_defence(spec: str, seed: int | None = None) -> Defence:
    """The defence a spec names (see the module docstring); `seed` for those that draw noise."""
    name, _, values = spec.partition(":")
    known = ", ".join(f"{k}{v[2]}" for k, v in SPECS.items())
    if name not in SPECS:
        raise TrainingError(f"unknown defence '{name}'; use one of: {known}")
    cls, count, form = SPECS[name]
    try:
        numbers = [float(v) for v in values.split(",")] if values else []
    except ValueError:
        numbers = []
        values = "?"
    if len(numbers) != count and not (name == "max-norm" and not values):
        raise TrainingError(f"defence '{spec}': write it as {name}{form}, e.g. "
                            f"{name}:{','.join(['1.0'] * count)}")
    arguments: dict[str, Any] = {} if cls is NoPeek else {"seed": seed}
    return cls(*numbers, **arguments)
