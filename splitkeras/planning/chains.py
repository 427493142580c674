"""A chain of hosts (any number of cuts, each segment on a host): `plan_chain`, `rank_chain`.

The same cost terms as `splitkeras.planning.cuts`, per segment and per link."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from splitkeras.planning.cuts import (
    batch_checks,
    compute_seconds,
    raise_first,
)
from splitkeras.profile import CutCandidate

__all__ = ["Link", "ChainConditions", "ChainPlan", "plan_chain", "chain_device_only", "rank_chain"]


@dataclass(frozen=True)
class Link:
    """One link of a chain: bandwidth in bits per second (> 0) and one-way latency in seconds (>= 0)."""

    bandwidth_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"link bandwidth must be > 0 bits/s, got {self.bandwidth_bps!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"link latency must be >= 0 s, got {self.latency_s!r}")


def _segment_hosts(placement: Sequence[str]) -> tuple[str, ...]:
    """The host of each segment: equal names are one host, except a run of equal names in a row,
    which are that many hosts (server, server -> server1, server2: a cut between two segments on
    one host would cost nothing and be pointless)."""
    names = [str(name).strip() for name in placement]
    if any(not name for name in names):
        raise ValueError(f"a host name in the chain {','.join(names)} is empty")
    runs = [(name, len(list(group))) for name, group in itertools.groupby(names)]
    hosts: list[str] = []
    for name, count in runs:
        numbered = [name] if count == 1 else [f"{name}{i}" for i in range(1, count + 1)]
        if count > 1 and (sum(other == name for other, _ in runs) > 1 or set(numbered) & set(names)):
            raise ValueError(
                f"the chain {','.join(names)} is ambiguous: '{name}' repeated in a row is a new host "
                f"each time ({', '.join(numbered)}), but the chain also has '{name}' elsewhere or one "
                "of those names; name the hosts apart, e.g. device,edge,cloud,device")
        hosts.extend(numbered)
    return tuple(hosts)


@dataclass(frozen=True)
class ChainConditions:
    """The hosts, links and speeds a chain plan is made for.

    Attributes:
        placement: the host of each segment, in order, e.g. ("device", "edge", "cloud",
            "device"). Equal names are the same host, except that names repeated in a row
            are distinct hosts, numbered: ("device", "server", "server", "device") is
            device -> server1 -> server2 -> device. Stored with those numbered names.
        links: one `Link` (or (bandwidth_bps, latency_s)) per pair of consecutive hosts
            in `hosts` order. The hosts are on a line in the order they first appear
            (device<->edge, edge<->cloud): the device talks only to the first server,
            and a hop between hosts that are not neighbours crosses every link between them.
        host_flops: sustained training FLOP/s of each host in `hosts` order (> 0), or
            None for a host taken as free.
        batch_size, wire_dtype, device_memory_bytes, bytes_per_parameter: as in
            `Conditions`; the memory budget is that of the first segment's host.
    """

    placement: tuple[str, ...]
    links: tuple[Link, ...]
    host_flops: tuple[float | None, ...]
    batch_size: int = 32
    wire_dtype: str = "float32"
    device_memory_bytes: float | None = None
    bytes_per_parameter: int = 16

    def __post_init__(self) -> None:
        placement = _segment_hosts(self.placement)
        object.__setattr__(self, "placement", placement)
        object.__setattr__(self, "links", tuple(
            link if isinstance(link, Link) else Link(*link) for link in self.links))
        object.__setattr__(self, "host_flops", tuple(self.host_flops))
        hosts = self.hosts
        route = " -> ".join(placement)
        pairs = ", ".join(f"{a}<->{b}" for a, b in zip(hosts, hosts[1:]))
        checks = [
            (len(placement) >= 2, f"a chain needs at least two segments, got {route!r}"),
            (len(self.links) == len(hosts) - 1,
             f"the chain {route} has {len(hosts)} hosts and {len(hosts) - 1} link(s) ({pairs}); "
             f"{len(self.links)} link(s) given"),
            (len(self.host_flops) == len(hosts),
             f"the chain {route} has {len(hosts)} hosts ({', '.join(hosts)}); "
             f"{len(self.host_flops)} FLOP/s given"),
            (all(f is None or f > 0 for f in self.host_flops),
             f"host FLOP/s must be > 0, got {list(self.host_flops)!r}"),
        ]
        raise_first(checks + batch_checks(self.batch_size, self.wire_dtype, self.device_memory_bytes))

    @property
    def hosts(self) -> tuple[str, ...]:
        """The distinct hosts in the order they first appear (the line the links join)."""
        return tuple(dict.fromkeys(self.placement))

    @property
    def wire_factor(self) -> float:
        return 0.5 if self.wire_dtype == "float16" else 1.0

    def speed(self, segment: int) -> float | None:
        """FLOP/s of the host of `segment`."""
        return self.host_flops[self.hosts.index(self.placement[segment])]

    def hop_links(self, cut: int) -> list[int]:
        """The links crossed between segment `cut - 1` and segment `cut` (cuts count from 1)."""
        position = {host: i for i, host in enumerate(self.hosts)}
        a, b = position[self.placement[cut - 1]], position[self.placement[cut]]
        return list(range(min(a, b), max(a, b)))


@dataclass(frozen=True)
class ChainPlan:
    """The predicted cost of training with a cut set over a chain of hosts, per sample.

    Per segment: its forward FLOPs and compute seconds; per link of the chain: the
    bytes sent + received over it, the transfer seconds and the latency seconds.
    """

    cuts: tuple[str, ...]
    placement: tuple[str, ...]  # the host of each segment
    segment_flops: tuple[int, ...]
    segment_seconds: tuple[float, ...]
    link_wire_bytes_per_sample: tuple[float, ...]
    link_transfer_seconds: tuple[float, ...]
    link_latency_seconds: tuple[float, ...]
    device_parameters: int  # the parameters of the segments on the first segment's host
    device_memory_bytes: int
    fits_device: bool
    head_parameters: int  # 0: the next host receives the model's input (almost) raw
    mode: str = "chain"  # or "device_only"
    compute_seconds: float = field(init=False)
    transfer_seconds: float = field(init=False)
    latency_seconds: float = field(init=False)
    wire_bytes_per_sample: float = field(init=False)
    total_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        sums = {"compute_seconds": sum(self.segment_seconds),
                "transfer_seconds": sum(self.link_transfer_seconds),
                "latency_seconds": sum(self.link_latency_seconds),
                "wire_bytes_per_sample": sum(self.link_wire_bytes_per_sample)}
        for name, value in sums.items():
            object.__setattr__(self, name, value)
        total = sums["compute_seconds"] + sums["transfer_seconds"] + sums["latency_seconds"]
        object.__setattr__(self, "total_seconds", total)

    @property
    def host_seconds(self) -> dict[str, float]:
        """Compute seconds per host, hosts in the order they first appear."""
        seconds: dict[str, float] = {}
        for host, value in zip(self.placement, self.segment_seconds):
            seconds[host] = seconds.get(host, 0.0) + value
        return seconds

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["host_seconds"] = self.host_seconds
        return data


def _before(first: CutCandidate, second: CutCandidate) -> bool:
    return first.head_flops <= second.head_flops and first.head_parameters <= second.head_parameters


def plan_chain(cuts: Sequence[CutCandidate], chain: ChainConditions) -> ChainPlan:
    """A cut set over a chain of hosts: segment k (between cuts k and k+1) on `chain.placement[k]`.

    The cost rule, per sample of a training step, for segments s_0..s_m and cuts c_1..c_m:

        compute  = sum over segments of 3 x forward FLOPs(s_k) / FLOP/s of s_k's host
                   (FLOPs(s_k) = head FLOPs of c_{k+1} - head FLOPs of c_k; 0 for a free host)
        for each cut c_k whose two segments are on different hosts (a hop), on every link of
        the line between the two hosts:
            transfer += 2 x bytes(c_k) x 8 / link bandwidth  (activations on, gradients back)
            latency  += 2 x link latency / batch size         (once each way)
        bytes(c_k) = `CutCandidate.bytes_per_sample` of c_k (halved for float16): every
                     tensor made at or before c_k and read after it.

    Skip tensors: because bytes(c_k) holds every tensor passing over cut k, a tensor made
    in segment i and read in segment j > i is charged on each hop i+1..j: it follows the
    chain's route, passed on by each host in between, over every link of that route. For
    device -> edge -> cloud -> device, a tensor from the head read on the cloud is charged
    on device<->edge and edge<->cloud, as it must travel; one made in the head and read
    back in the tail on the device is charged on every link of the whole route (twice on
    each): an upper bound, since splitkeras carries a tensor straight to the segment that
    reads it (`splitkeras.graph`) -- the same bound as a U-shaped pair's. This rule makes
    the cost a sum of terms of one cut or of two consecutive cuts, which is what lets
    `rank_chain` search all cut sets exactly by dynamic programming.

    With placement ("device", "server") this gives `plan_single`'s numbers, with
    ("device", "server", "device") `plan_pair`'s (one link, server FLOP/s as given).

    Raises:
        ValueError: the wrong number of cuts for the placement, or cuts out of order.
    """
    count = len(chain.placement) - 1
    if len(cuts) != count:
        raise ValueError(f"the chain {' -> '.join(chain.placement)} has {count + 1} segments and "
                         f"needs {count} cut(s), got {len(cuts)}")
    for first, second in zip(cuts, cuts[1:]):
        if not _before(first, second) or first.layer == second.layer:
            raise ValueError(f"cut '{first.layer}' must come before cut '{second.layer}'")
    total_flops = cuts[0].head_flops + cuts[0].tail_flops
    total_parameters = cuts[0].head_parameters + cuts[0].tail_parameters
    flops_bounds = [0, *(c.head_flops for c in cuts), total_flops]
    parameter_bounds = [0, *(c.head_parameters for c in cuts), total_parameters]
    segment_flops = [b - a for a, b in zip(flops_bounds, flops_bounds[1:])]
    segment_parameters = [b - a for a, b in zip(parameter_bounds, parameter_bounds[1:])]
    link_bytes = [0.0] * len(chain.links)
    link_transfer = [0.0] * len(chain.links)
    link_latency = [0.0] * len(chain.links)
    for k, cut in enumerate(cuts, 1):
        wire = 2.0 * cut.bytes_per_sample * chain.wire_factor
        for index in chain.hop_links(k):
            link = chain.links[index]
            link_bytes[index] += wire
            link_transfer[index] += wire * 8.0 / link.bandwidth_bps
            link_latency[index] += 2.0 * link.latency_s / chain.batch_size
    device = chain.placement[0]
    device_parameters = sum(p for host, p in zip(chain.placement, segment_parameters) if host == device)
    return _chain_plan(chain, tuple(c.layer for c in cuts), chain.placement, segment_flops,
                       [compute_seconds(f, chain.speed(k)) for k, f in enumerate(segment_flops)],
                       link_bytes, link_transfer, link_latency, device_parameters,
                       segment_parameters[0], "chain")


def _chain_plan(chain: ChainConditions, cuts: tuple[str, ...], placement: Sequence[str],
                segment_flops: Sequence[int], segment_seconds: Sequence[float],
                link_bytes: Sequence[float], link_transfer: Sequence[float],
                link_latency: Sequence[float], device_parameters: int, head_parameters: int,
                mode: str) -> ChainPlan:
    memory = device_parameters * chain.bytes_per_parameter
    budget = chain.device_memory_bytes
    return ChainPlan(
        cuts=cuts, placement=tuple(placement), segment_flops=tuple(segment_flops),
        segment_seconds=tuple(segment_seconds), link_wire_bytes_per_sample=tuple(link_bytes),
        link_transfer_seconds=tuple(link_transfer), link_latency_seconds=tuple(link_latency),
        device_parameters=device_parameters, device_memory_bytes=memory,
        fits_device=budget is None or memory <= budget, head_parameters=head_parameters, mode=mode)


def chain_device_only(candidates: Sequence[CutCandidate], chain: ChainConditions) -> ChainPlan:
    """The reference: the whole model trains on the first segment's host, nothing crosses."""
    if not candidates:
        raise ValueError("no cut candidates")
    any_cut = candidates[0]
    flops = any_cut.head_flops + any_cut.tail_flops
    parameters = any_cut.head_parameters + any_cut.tail_parameters
    zeros = [0.0] * len(chain.links)
    return _chain_plan(chain, (), chain.placement[:1], [flops], [compute_seconds(flops, chain.speed(0))],
                       zeros, zeros, zeros, parameters, parameters, "device_only")


def _best_paths(candidates: Sequence[CutCandidate], chain: ChainConditions,
                limit: int | None) -> list[tuple[int, ...]]:
    """The `limit` cheapest cut sets (indices into `candidates`), cheapest first; all when None.

    Exact k-best dynamic programming over the cuts in order: with `plan_chain`'s rule the
    cost is alpha_0 F(c_1) + sum_k alpha_k (F(c_{k+1}) - F(c_k)) + alpha_m (F_total - F(c_m))
    + sum_k (beta_k bytes(c_k) + gamma_k), where F is a cut's head FLOPs, alpha_k 3 / the
    FLOP/s of segment k's host, and beta_k, gamma_k the per-byte and fixed cost of hop k.
    So the best `limit` ways to reach cut k at candidate j extend the best `limit` ways to
    reach cut k-1 at each earlier candidate i: O(cuts x candidates^2) merges, not
    candidates^cuts evaluations.
    """
    count = len(chain.placement) - 1
    speeds = [chain.speed(k) for k in range(count + 1)]
    alpha = [0.0 if speed is None else 3.0 / speed for speed in speeds]
    beta, gamma = [0.0], [0.0]
    for k in range(1, count + 1):
        links = [chain.links[i] for i in chain.hop_links(k)]
        beta.append(sum(16.0 * chain.wire_factor / link.bandwidth_bps for link in links))
        gamma.append(sum(2.0 * link.latency_s / chain.batch_size for link in links))
    flops = [c.head_flops for c in candidates]
    parameters = [c.head_parameters for c in candidates]
    sizes = [c.bytes_per_sample for c in candidates]
    total = candidates[0].head_flops + candidates[0].tail_flops
    Entries = list[tuple[float, tuple[int, ...]]]
    layer: list[Entries] = [[(alpha[0] * flops[j] + beta[1] * sizes[j] + gamma[1], (j,))]
                            for j in range(len(candidates))]
    for k in range(1, count):  # segment k lies between cut k (at i) and cut k + 1 (at j)
        shifted = [[(cost - alpha[k] * flops[i], path) for cost, path in entries]
                   for i, entries in enumerate(layer)]
        grown: list[Entries] = []
        for j in range(len(candidates)):
            sources = [shifted[i] for i in range(j) if shifted[i] and flops[i] <= flops[j]
                       and parameters[i] <= parameters[j]]
            added = alpha[k] * flops[j] + beta[k + 1] * sizes[j] + gamma[k + 1]
            grown.append([(cost + added, (*path, j))
                          for cost, path in itertools.islice(heapq.merge(*sources), limit)])
        layer = grown
    finals: Iterator[tuple[float, tuple[int, ...]]] = heapq.merge(*(
        [(cost + alpha[count] * (total - flops[j]), path) for cost, path in entries]
        for j, entries in enumerate(layer)))
    return [path for _, path in itertools.islice(finals, limit)]


def rank_chain(
    candidates: Sequence[CutCandidate],
    chain: ChainConditions,
    *,
    top: int | None = None,
    valid: Callable[[tuple[str, ...]], bool] | None = None,
    include_unfit: bool = False,
    max_paths: int = 100_000,
) -> list[ChainPlan]:
    """Plans for every cut set c_1 < ... < c_m of `candidates` over `chain`, fastest first.

    The search is exact (`_best_paths`: dynamic programming, O(cuts x candidates^2)), not
    pruned. Cut sets are then checked lazily in rank order -- the memory budget and
    `valid(cuts)` (e.g. `splitkeras.graph.plan_segments` accepts them) -- and when too
    many are refused to fill `top`, the search asks for 4x as many, up to `max_paths`
    cut sets examined in all (fewer than `top` plans come back only past that bound).

    Args:
        candidates: `cut_candidates(model)` (in topological order).
        chain: the placement, links and host speeds.
        top: how many plans to return (all cut sets when None: candidates^cuts of them).
        valid: refuses a cut set (layer names) that is not a valid split.
        include_unfit: keep plans whose device parameters exceed the memory budget.
        max_paths: the most cut sets examined when refusals ask for more.
    """
    if not candidates:
        return []
    limit = top
    verdicts: dict[tuple[int, ...], bool] = {}
    while True:
        paths = _best_paths(candidates, chain, limit)
        plans: list[ChainPlan] = []
        for path in paths:
            plan = plan_chain([candidates[i] for i in path], chain)
            if not include_unfit and not plan.fits_device:
                continue
            if valid is not None:
                if path not in verdicts:
                    verdicts[path] = valid(plan.cuts)
                if not verdicts[path]:
                    continue
            plans.append(plan)
            if top is not None and len(plans) >= top:
                break
        if limit is None or top is None or len(plans) >= top or len(paths) < limit \
                or limit >= max_paths:
            plans.sort(key=lambda p: (p.total_seconds, p.cuts))
            return plans
        limit = min(4 * limit, max_paths)
