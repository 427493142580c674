"""One or two cuts between a device and one server: the cost model of `splitkeras.planning`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from splitkeras.profile import CutCandidate

__all__ = ["Conditions", "CutPlan", "plan_single", "plan_pair", "device_only", "rank_cuts"]


def batch_checks(batch_size: int, wire_dtype: str, device_memory_bytes: float | None
                  ) -> list[tuple[bool, str]]:
    """The checks both kinds of conditions share."""
    return [
        (batch_size >= 1, f"batch size must be >= 1, got {batch_size!r}"),
        (wire_dtype in ("float32", "float16"), f"wire dtype must be 'float32' or 'float16', got {wire_dtype!r}"),
        (device_memory_bytes is None or device_memory_bytes > 0,
         f"device memory must be > 0 bytes, got {device_memory_bytes!r}"),
    ]


def raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class Conditions:
    """The link and the two machines a plan is made for.

    Attributes:
        bandwidth_bps: link bandwidth in bits per second (> 0), both directions.
        latency_s: one-way latency in seconds (>= 0).
        device_flops: sustained FLOP/s of the device for training (> 0).
        server_flops: sustained FLOP/s of the server, or None to take the server as free.
        batch_size: samples per step; the latency of a step is shared by them.
        wire_dtype: "float32" or "float16" (half the bytes on the wire).
        device_memory_bytes: the device's budget for its segments' parameters, or None.
        bytes_per_parameter: device bytes per parameter (16: weights, gradients, Adam).
    """

    bandwidth_bps: float
    latency_s: float
    device_flops: float
    server_flops: float | None = None
    batch_size: int = 32
    wire_dtype: str = "float32"
    device_memory_bytes: float | None = None
    bytes_per_parameter: int = 16

    def __post_init__(self) -> None:
        checks = [
            (self.bandwidth_bps > 0, f"bandwidth must be > 0 bits/s, got {self.bandwidth_bps!r}"),
            (self.latency_s >= 0, f"latency must be >= 0 s, got {self.latency_s!r}"),
            (self.device_flops > 0, f"device FLOP/s must be > 0, got {self.device_flops!r}"),
            (self.server_flops is None or self.server_flops > 0,
             f"server FLOP/s must be > 0, got {self.server_flops!r}"),
        ]
        raise_first(checks + batch_checks(self.batch_size, self.wire_dtype, self.device_memory_bytes))

    @property
    def wire_factor(self) -> float:
        return 0.5 if self.wire_dtype == "float16" else 1.0


@dataclass(frozen=True)
class CutPlan:
    """The predicted cost of training with one cut or a pair of cuts, per sample."""

    cuts: tuple[str, ...]
    mode: str  # "labels_on_server" (one cut), "u_shaped" (two) or "device_only"
    device_seconds: float
    server_seconds: float
    transfer_seconds: float
    latency_seconds: float
    wire_bytes_per_sample: float  # sent + received
    device_parameters: int
    device_memory_bytes: int
    fits_device: bool
    head_parameters: int  # 0: the server receives the model's input (almost) raw
    total_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        total = self.device_seconds + self.server_seconds + self.transfer_seconds + self.latency_seconds
        object.__setattr__(self, "total_seconds", total)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cuts"] = list(self.cuts)
        return data


def compute_seconds(flops: float, speed: float | None) -> float:
    return 0.0 if speed is None else 3.0 * flops / speed


def _plan(cuts: tuple[str, ...], mode: str, device_flops: float, server_flops: float,
          crossing_bytes: float, requests: int, device_parameters: int,
          conditions: Conditions, head_parameters: int) -> CutPlan:
    wire_bytes = 2.0 * crossing_bytes * conditions.wire_factor
    memory = device_parameters * conditions.bytes_per_parameter
    budget = conditions.device_memory_bytes
    return CutPlan(
        cuts=cuts, mode=mode,
        device_seconds=compute_seconds(device_flops, conditions.device_flops),
        server_seconds=compute_seconds(server_flops, conditions.server_flops),
        transfer_seconds=wire_bytes * 8.0 / conditions.bandwidth_bps,
        latency_seconds=2.0 * requests * conditions.latency_s / conditions.batch_size,
        wire_bytes_per_sample=wire_bytes,
        device_parameters=device_parameters,
        device_memory_bytes=memory,
        fits_device=budget is None or memory <= budget,
        head_parameters=head_parameters,
    )


def plan_single(cut: CutCandidate, conditions: Conditions) -> CutPlan:
    """One cut: the head on the device, the rest (and the labels) on the server.

    Example:
        >>> cut = CutCandidate("c", "Conv2D", [[None, 4]], ["c"], 16, 10, 90, 1_000, 9_000)
        >>> plan = plan_single(cut, Conditions(8e6, 0.01, 1e9, server_flops=1e10, batch_size=10))
        >>> round(plan.total_seconds, 9)   # 3e-6 device + 2.7e-6 server + 3.2e-5 bytes + 2e-3 latency
        0.0020377
    """
    return _plan((cut.layer,), "labels_on_server", cut.head_flops, cut.tail_flops,
                 cut.bytes_per_sample, 1, cut.head_parameters, conditions, cut.head_parameters)


def plan_pair(first: CutCandidate, second: CutCandidate, conditions: Conditions) -> CutPlan:
    """Two cuts, U-shaped: head (to `first`) and tail (after `second`) on the device.

    `first` must come before `second` (its head inside the second's head).
    """
    if first.head_flops > second.head_flops or first.head_parameters > second.head_parameters:
        raise ValueError(f"cut '{first.layer}' must come before cut '{second.layer}'")
    total_flops = second.head_flops + second.tail_flops
    device_flops = first.head_flops + second.tail_flops
    server_flops = total_flops - device_flops
    device_parameters = first.head_parameters + second.tail_parameters
    return _plan((first.layer, second.layer), "u_shaped", device_flops, server_flops,
                 first.bytes_per_sample + second.bytes_per_sample, 2, device_parameters, conditions,
                 first.head_parameters)


def device_only(candidates: Sequence[CutCandidate], conditions: Conditions) -> CutPlan:
    """The reference: the whole model trains on the device, nothing crosses."""
    if not candidates:
        raise ValueError("no cut candidates")
    any_cut = candidates[0]
    flops = any_cut.head_flops + any_cut.tail_flops
    parameters = any_cut.head_parameters + any_cut.tail_parameters
    return _plan((), "device_only", flops, 0.0, 0.0, 0, parameters, conditions, parameters)


def rank_cuts(
    candidates: Sequence[CutCandidate],
    conditions: Conditions,
    *,
    single: bool = True,
    pairs: bool = False,
    top: int | None = None,
    valid_pair: Callable[[str, str], bool] | None = None,
    include_unfit: bool = False,
) -> list[CutPlan]:
    """Plans for the cuts of a model, fastest first.

    Args:
        candidates: `cut_candidates(model)` (in topological order).
        conditions: the link and the machines.
        single: rank single cuts (labels on the server).
        pairs: rank pairs of cuts (U-shaped); pairs are checked lazily with
            `valid_pair(first, second)` in rank order until `top` valid ones are found.
        top: how many plans to return (all when None).
        include_unfit: keep plans whose device parameters exceed the memory budget.

    Example:
        >>> plans = rank_cuts(cut_candidates(model), Conditions(20e6, 0.05, 5e9), top=3)  # doctest: +SKIP
    """
    plans: list[CutPlan] = []
    if single:
        plans.extend(plan_single(c, conditions) for c in candidates)
    if pairs:
        plans.extend(_pairs(candidates, conditions))
    if not include_unfit:
        plans = [p for p in plans if p.fits_device]
    plans.sort(key=lambda p: (p.total_seconds, p.cuts))
    result: list[CutPlan] = []
    for plan in plans:
        if top is not None and len(result) >= top:
            break
        if plan.mode == "u_shaped" and valid_pair is not None and not valid_pair(*plan.cuts):
            continue
        result.append(plan)
    return result


def _pairs(candidates: Sequence[CutCandidate], conditions: Conditions) -> Iterable[CutPlan]:
    for i, first in enumerate(candidates):
        for second in candidates[i + 1:]:
            if first.head_flops <= second.head_flops and \
                    first.head_parameters <= second.head_parameters:
                yield plan_pair(first, second, conditions)
