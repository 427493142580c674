"""The split's shape as data: which segment runs where, and who holds the labels.

A `Topology` is derived once from the ordered segments (a `Manifest`'s entries or a
`Split`'s segments) and is what every step loop walks:

* the segments in order, each with its *host*: `"device"`, or the name of the server
  that runs it (by default the segment's own name: one server process per server
  segment, `splitkeras serve OUT --segment NAME`);
* the label segment: the last one (it computes the loss);
* the *stages*: each device segment is a stage of its own; a maximal run of
  consecutive server segments is ONE stage, a chain of servers (device -> edge ->
  cloud). The device talks only to a stage's first server; the servers of a chain hand
  activations and gradients to each other directly, so what travels between them never
  reaches the phone.

An interface (`interface(start, stop)`) is what a run of segments takes and gives:
its inputs are the tensors its segments read that were produced before it (model
inputs included), in order of first use; its outputs are the tensors it produces that
a later segment reads, or that are model outputs. A server at position k of a chain
serves the interface of the chain's rest (`served(name)`): it runs its own segment and
passes on, to the next server, what the rest of the chain needs.

`mode` is a label derived here, not a branch elsewhere: `"labels_on_server"` when the
last segment runs on a server, `"u_shaped"` when the labels stay on the device and some
segment runs on a server, `"local"` when every segment is on the device.

Rules (refused with `ManifestError` and the reason): the first segment runs on the
device (it holds the model inputs), and a placement is `"device"` or `"server"`.

Example:
    >>> topology = Topology.from_manifest(Manifest.read("out"))       # doctest: +SKIP
    >>> [(s.kind, s.segments) for s in topology.stages]               # doctest: +SKIP
    [('device', ('head',)), ('server', ('middle_1', 'middle_2')), ('device', ('tail',))]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from splitkeras.errors import ManifestError
from splitkeras.tensor_spec import TensorSpec

__all__ = ["Topology", "Stage", "Served", "PLACEMENTS", "DEVICE", "check_placements", "default_host"]

DEVICE = "device"
PLACEMENTS = ("device", "server")


class _SegmentLike(Protocol):
    name: str
    placement: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Stage:
    """A device segment, or a chain of consecutive server segments (served by its first).

    Attributes:
        kind: `"device"` or `"server"`.
        segments: the names of its segments, in order.
        host: `"device"`, or the host of its first server segment.
        inputs, outputs: its interface (see the module docstring).
        holds_labels: it contains the last segment.
    """

    kind: str
    segments: tuple[str, ...]
    host: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    holds_labels: bool

    @property
    def name(self) -> str:
        """The name of its first segment (a server stage is addressed by it)."""
        return self.segments[0]

    @property
    def mode(self) -> str:
        """How a device drives it: `"labels_on_server"` (train route) or `"u_shaped"`
        (forward/backward routes)."""
        return "labels_on_server" if self.holds_labels else "u_shaped"


@dataclass(frozen=True)
class Served:
    """What the server of one server segment serves: the rest of its chain from it on.

    Attributes:
        segment: the segment this server runs.
        next: the next server segment of the chain (whose server this one calls), or None.
        inputs, outputs: the interface of the chain from `segment` on.
        holds_labels: the chain ends with the last segment (train route).
        next_inputs, next_outputs: the interface of the chain from `next` on (empty if none).
    """

    segment: str
    next: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    holds_labels: bool
    next_inputs: tuple[TensorSpec, ...] = ()
    next_outputs: tuple[TensorSpec, ...] = ()

    @property
    def mode(self) -> str:
        return "labels_on_server" if self.holds_labels else "u_shaped"


class Topology:
    """The ordered segments, their hosts, the stages and the label segment of a split.

    Args:
        segments: objects with `name`, `placement`, `inputs`, `outputs` (and optionally
            `host`), in data-flow order.
        model_inputs, model_outputs: the model's boundary specs.
    """

    def __init__(self, segments: Sequence[_SegmentLike], model_inputs: Sequence[TensorSpec],
                 model_outputs: Sequence[TensorSpec]) -> None:
        if len(segments) < 2:
            raise ManifestError("A split needs at least two segments.")
        self.segments = list(segments)
        self.names = [s.name for s in segments]
        self.placements = [s.placement for s in segments]
        self.model_inputs = list(model_inputs)
        self.model_outputs = list(model_outputs)
        check_placements(self.names, self.placements)
        self.hosts = [default_host(s) for s in segments]
        self._index = {name: i for i, name in enumerate(self.names)}
        self.stages = self._stages()

    @classmethod
    def from_manifest(cls, manifest: Any) -> Topology:
        return cls(manifest.segments, manifest.model_inputs, manifest.model_outputs)

    @classmethod
    def from_split(cls, split: Any) -> Topology:
        return cls(split.segments, split.model_inputs, split.model_outputs)

    def __repr__(self) -> str:
        return f"<Topology {','.join(self.placements)} ({self.mode})>"

    # ---- derived labels ------------------------------------------------------------------------
    @property
    def label_segment(self) -> str:
        return self.names[-1]

    @property
    def mode(self) -> str:
        if self.placements[-1] == "server":
            return "labels_on_server"
        return "u_shaped" if "server" in self.placements else "local"

    @property
    def server_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "server"]

    @property
    def server_segments(self) -> list[str]:
        return [n for n, p in zip(self.names, self.placements) if p == "server"]

    def index(self, name: str) -> int:
        if name not in self._index:
            raise ManifestError(f"The split has no segment named '{name}' (segments: "
                                f"{', '.join(self.names)}).")
        return self._index[name]

    # ---- interfaces ----------------------------------------------------------------------------
    def interface(self, start: int, stop: int) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs and outputs of the run of segments `start` .. `stop - 1`."""
        inside = self.segments[start:stop]
        produced = {spec.name for s in inside for spec in s.outputs}
        inputs: dict[str, TensorSpec] = {}
        for segment in inside:
            for spec in segment.inputs:
                if spec.name not in produced and spec.name not in inputs:
                    inputs[spec.name] = spec
        later = {spec.name for s in self.segments[stop:] for spec in s.inputs}
        later |= {spec.name for spec in self.model_outputs}
        outputs: dict[str, TensorSpec] = {}
        for segment in inside:
            for spec in segment.outputs:
                if spec.name in later and spec.name not in outputs:
                    outputs[spec.name] = spec
        return tuple(inputs.values()), tuple(outputs.values())

    def stage_of(self, name: str) -> Stage:
        for stage in self.stages:
            if name in stage.segments:
                return stage
        raise ManifestError(f"The split has no segment named '{name}'.")  # pragma: no cover

    def served(self, name: str) -> Served:
        """What the server of server segment `name` serves (the chain from it on)."""
        index = self.index(name)
        if self.placements[index] != "server":
            raise ManifestError(f"Segment '{name}' runs on the device, not on a server. Server "
                                f"segments: {', '.join(self.server_segments) or 'none'}.")
        stage = self.stage_of(name)
        stop = self.index(stage.segments[-1]) + 1
        inputs, outputs = self.interface(index, stop)
        following = self.names[index + 1] if index + 1 < stop else None
        next_inputs, next_outputs = self.interface(index + 1, stop) if following else ((), ())
        return Served(name, following, inputs, outputs, stage.holds_labels, next_inputs, next_outputs)

    def _stages(self) -> list[Stage]:
        stages: list[Stage] = []
        start = 0
        count = len(self.segments)
        while start < count:
            stop = start + 1
            if self.placements[start] == "server":
                while stop < count and self.placements[stop] == "server":
                    stop += 1
            inputs, outputs = self.interface(start, stop)
            stages.append(Stage(self.placements[start], tuple(self.names[start:stop]),
                                self.hosts[start], inputs, outputs, stop == count))
            start = stop
        return stages


def check_placements(names: Sequence[str], placements: Sequence[str]) -> None:
    """The placement rules: each one `"device"` or `"server"`, the first on the device."""
    for name, placement in zip(names, placements):
        if placement not in PLACEMENTS:
            raise ManifestError(f"Segment '{name}' has placement '{placement}'; expected one of "
                                f"{PLACEMENTS}.")
    if placements and placements[0] != DEVICE:
        raise ManifestError(
            f"The first segment '{names[0]}' is placed on the {placements[0]}, but it reads the "
            "model inputs, which must not leave the device. Place the first segment on the "
            "device (e.g. --placement device,server,...).")


def default_host(segment: Any) -> str:
    """`"device"` for a device segment; else the segment's `host`, by default its name."""
    if segment.placement == DEVICE:
        return DEVICE
    return str(getattr(segment, "host", None) or segment.name)
