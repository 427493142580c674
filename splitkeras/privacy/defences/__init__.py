"""Defences a device turns on (`DeviceClient(..., defences=[...])`), one module per concept."""

from splitkeras.privacy.defences.activations import ActivationNoise
from splitkeras.privacy.defences.base import Defence, apply_defences
from splitkeras.privacy.defences.gradients import GradientNoise, MaxNorm
from splitkeras.privacy.defences.labels import RandomizedResponse
from splitkeras.privacy.defences.nopeek import NoPeek, distance_correlation
from splitkeras.privacy.defences.spec import parse_defence

__all__ = ["ActivationNoise", "Defence", "GradientNoise", "MaxNorm", "NoPeek", "RandomizedResponse",
           "apply_defences", "distance_correlation", "parse_defence"]
