"""Guards for a segment that many devices share: what it accepts, and what an update may do.

A server trains ONE segment for every device, so one bad request (activations x1e30, a
gradient of -2e19, a negative sample weight of 1e30) would poison the weights of all of
them. `UpdateGuard` holds the rules and the running statistics; `SegmentRunner` (given a
guard) applies them around each step as compute, check, commit: a refused step raises
`UpdateRefused` and changes nothing (docs/protocol.md, "Guards").

The rules, for every float tensor of a step (the activations, gradients, float labels and
sample weights a device sends; the outputs, input gradients and loss the segment computes):

* finite, and `max|x| <= max_abs` (default 1e10) always;
* for what a device sends, its *scale* at most `factor` (default 1000) times its *running
  scale*, once `warmup` (default 10) requests were accepted for that tensor. The scale is
  `max|x|`, and for a gradient `max|x| * batch` (a mean loss gives each sample 1/batch of
  the gradient, so devices with other batch sizes compare alike). The running scale is a
  geometric moving average of the accepted scales: `log s += w * (log scale - log s)`,
  `w = max(1/n, 1 - decay)` (the plain mean of the logs during the warm-up, then an
  exponential average with `decay` 0.99), so one accepted request moves it by at most
  `factor ** w`. A zero tensor is always within bounds and does not move the average.
  (What the segment computes from accepted inputs is not held to a relative bound: its
  scale can swing by decades on honest data, e.g. the input gradient of a BatchNorm over a
  batch of two);
* sample weights non-negative;
* after the update: every new weight, moving statistic and optimizer slot finite, and every
  trainable weight `max|w| <= max_weight` (default 1e6); else the update is rolled back;
* what the segment computes and sends back (outputs, input gradients) within the range of the
  answer's wire dtype when the caller sets `answer_limit` (65504 for a float16 session): an
  answer that cannot be encoded refuses the step before its update is applied, instead of
  leaving an applied update without an answer.

Optionally (`max_grad_norm`), the gradients a device sends with a backward are clipped to
that global L2 norm (over all its tensors) before they are applied.

A tensor that breaks a rule the device controls is `out_of_bounds`; a step whose result
(outputs, input gradients, loss, new weights) breaks one is `update_refused`. Only accepted
requests move the running scales. NumPy only: the TensorFlow side is in `splitkeras.engine`.

Example:
    >>> guard = UpdateGuard(GuardConfig(factor=100.0))                   # doctest: +SKIP
    >>> runner = SegmentRunner(segment, optimizer, guard=guard)           # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from splitkeras.errors import UpdateRefused

__all__ = ["GuardConfig", "UpdateGuard", "RunningScale", "Measured"]

Measured = tuple[str, float]  # (statistic key, scale) of one accepted tensor

# role -> (what it is, in a message; whether the device sent it; whether its scale is per sample)
ROLES: dict[str, tuple[str, bool, bool]] = {
    "input": ("input tensor '{name}'", True, False),
    "label": ("label '{name}'", True, False),
    "sample_weight": ("sample_weight", True, False),
    "output_grad": ("the gradient of output '{name}'", True, True),
    "output": ("output '{name}' computed from it", False, False),
    "input_grad": ("the gradient of input '{name}' computed from it", False, True),
    "loss": ("the loss computed from it", False, False),
    "regularization": ("the regularization loss", False, False),
}


ANSWERED = ("output", "input_grad")  # computed tensors that travel back in the answer


@dataclass(frozen=True)
class GuardConfig:
    """The bounds of an `UpdateGuard` (see the module docstring for the rule).

    Attributes:
        factor: a tensor's scale may be at most this times its running scale.
        warmup: accepted requests per tensor before the relative bound applies.
        decay: of the running scale's exponential average (after the warm-up).
        max_abs: the largest |value| any tensor of a step may hold.
        max_weight: the largest |value| a trainable weight may take.
        max_grad_norm: clip the gradients a device sends to this global L2 norm (None: no clip).
    """

    factor: float = 1000.0
    warmup: int = 10
    decay: float = 0.99
    max_abs: float = 1e10
    max_weight: float = 1e6
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("factor", "max_abs", "max_weight"):
            value = getattr(self, name)
            if not value > (1.0 if name == "factor" else 0.0):
                raise ValueError(f"{name} must be {'> 1' if name == 'factor' else '> 0'}, got {value}.")
        if self.warmup < 0 or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"warmup must be >= 0 and decay in [0, 1), got {self.warmup}, {self.decay}.")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}.")


class RunningScale:
    """The geometric moving average of one tensor's accepted scales."""

    __slots__ = ("count", "log_scale")

    def __init__(self) -> None:
        self.count = 0
        self.log_scale = 0.0

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale) if self.count else 0.0

    def add(self, scale: float, decay: float) -> None:
        if not scale > 0.0:  # a zero tensor says nothing about the scale
            return
        self.count += 1
        weight = max(1.0 / self.count, 1.0 - decay)
        self.log_scale += weight * (math.log(scale) - self.log_scale)


def _max_abs(array: np.ndarray) -> float:
    if not array.size:
        return 0.0
    return float(max(array.max(), -array.min()))  # NaN propagates; no |x| copy


def _describe(role: str, name: str) -> str:
    return ROLES[role][0].format(name=name)


class UpdateGuard:
    """The bounds and running scales of one shared segment (one writer thread uses it).

    `measure` checks one tensor and returns what `accept` records once the whole step was
    accepted; `clip` applies `max_grad_norm`.
    """

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self.scales: dict[str, RunningScale] = {}
        # the largest |x| the answer of the step at hand can carry (set per step by the caller:
        # the session's wire dtype), None: no bound beyond max_abs
        self.answer_limit: float | None = None

    # ---- the rules ---------------------------------------------------------------------------
    def refuse(self, role: str, message: str, step_kept: bool = False, **details: Any) -> UpdateRefused:
        sent = ROLES[role][1]
        tail = "" if sent else " Nothing was applied."
        return UpdateRefused("out_of_bounds" if sent else "update_refused", message + tail,
                             step_kept=step_kept, **details)

    def measure(self, role: str, name: str, value: Any, *, step_kept: bool = False) -> Measured | None:
        """Check one tensor of a step; `UpdateRefused` if it breaks a rule. Returns its
        (key, scale) for `accept`, or None for a tensor that has no running scale (not float,
        or computed by the segment)."""
        array = np.asarray(value)
        if array.dtype.kind != "f":
            return None
        config = self.config
        biggest = _max_abs(array)
        what = _describe(role, name)
        if not math.isfinite(biggest):
            raise self.refuse(role, f"The server refused the step: {what} holds NaN or Inf.", step_kept,
                              tensor=name)
        if role == "sample_weight" and array.size and float(array.min()) < 0.0:
            raise self.refuse(role, f"The server refused the step: sample_weight holds {float(array.min()):.3g}; "
                              "sample weights must be >= 0.", step_kept, tensor=name)
        if biggest > config.max_abs:
            raise self.refuse(role, f"The server refused the step: {what} holds |x| = {biggest:.3g}, over the "
                              f"server's limit of {config.max_abs:.3g}.", step_kept, tensor=name)
        if not ROLES[role][1]:  # computed here: finite, within max_abs and the answer's range
            limit = self.answer_limit
            if limit is not None and role in ANSWERED and biggest > limit:
                raise self.refuse(role, f"The server refused the step: {what} holds |x| = {biggest:.3g}, "
                                  f"beyond {limit:.6g}, the largest value this session's wire dtype can "
                                  "carry back (float16). Open the session with wire_dtype 'float32', or "
                                  "lower the learning rate.", step_kept, tensor=name)
            return None
        batch = int(array.shape[0]) if ROLES[role][2] and array.ndim else 1
        scale = biggest * batch
        key = f"{role}:{name}"
        running = self.scales.get(key)
        if running is not None and running.count >= config.warmup and running.count:
            bound = config.factor * running.scale
            if scale > bound:
                per = " x batch" if ROLES[role][2] else ""
                raise self.refuse(
                    role, f"The server refused the step: {what} has scale max|x|{per} = {scale:.3g}, over "
                    f"{config.factor:g} x its running scale {running.scale:.3g} over accepted requests "
                    f"(the bound is {bound:.3g}; see docs/protocol.md, \"Guards\").", step_kept, tensor=name,
                    scale=scale, bound=bound)
        return key, scale

    def measure_all(self, role: str, names: Sequence[str], values: Iterable[Any], *,
                    step_kept: bool = False) -> list[Measured]:
        found = []
        for name, value in zip(names, values):
            if value is not None:
                measured = self.measure(role, name, value, step_kept=step_kept)
                if measured is not None:
                    found.append(measured)
        return found

    def accept(self, measured: Iterable[Measured]) -> None:
        """Record the scales of an accepted step."""
        for key, scale in measured:
            self.scales.setdefault(key, RunningScale()).add(scale, self.config.decay)

    def clip(self, grads: Sequence[Any]) -> list[Any]:
        """The gradients scaled to `max_grad_norm` when their global L2 norm is over it (the
        very same objects when it is not, or when no clip is set)."""
        limit = self.config.max_grad_norm
        if limit is None:
            return list(grads)
        arrays = [None if g is None else np.asarray(g) for g in grads]
        norm = math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64)))
                             for a in arrays if a is not None and a.dtype.kind == "f"))
        if norm <= limit:
            return list(grads)
        factor = limit / norm
        return [g if a is None or a.dtype.kind != "f" else (a * factor).astype(a.dtype)
                for g, a in zip(grads, arrays)]

    def bound_weight(self, biggest: float, finite: bool, step_kept: bool = False) -> None:
        """After an update: every new variable finite, trainable weights within `max_weight`."""
        if not finite:
            raise UpdateRefused("update_refused", "The server refused the step: the update would make a "
                                "weight, a moving statistic or an optimizer slot NaN or Inf. Nothing was "
                                "applied.", step_kept=step_kept)
        if biggest > self.config.max_weight:
            raise UpdateRefused("update_refused", f"The server refused the step: the update would make a "
                                f"weight |w| = {biggest:.3g}, over the server's limit of "
                                f"{self.config.max_weight:.3g}. Nothing was applied.", step_kept=step_kept)

    def state(self) -> dict[str, list[float]]:
        """The running scales, exactly (for a checkpoint): key -> [log scale, accepted count]."""
        return {key: [s.log_scale, s.count] for key, s in sorted(self.scales.items())}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back the running scales of `state()` (a server's checkpoint)."""
        scales: dict[str, RunningScale] = {}
        for key, (log_scale, count) in state.items():
            scale = scales[str(key)] = RunningScale()
            scale.log_scale, scale.count = float(log_scale), int(count)
        self.scales = scales

    def describe(self) -> dict[str, Any]:
        """The settings and running scales (for the operator, `/readyz` with the key)."""
        return {"config": asdict(self.config),
                "scales": {key: {"scale": s.scale, "accepted": s.count} for key, s in sorted(self.scales.items())}}
