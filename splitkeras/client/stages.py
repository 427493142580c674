"""The server stages a device talks to: one URL and one session each, checked against the
split's topology (a chain of server segments is one stage, on its first server)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from splitkeras.client.transport import Transport
from splitkeras.errors import ProtocolError, TrainingError
from splitkeras.segments import Segment
from splitkeras.topology import Stage

__all__ = ["open_stage", "stage_segment", "stage_urls"]


def open_stage(transport: Transport, stage: Stage, wire_dtype: str, compress: str | None = None) -> dict[str, Any]:
    """Open a session on a server stage's first server and check that it serves that stage."""
    session = transport.open_session(wire_dtype, compress)
    expected = ([s.to_json() for s in stage.inputs], [s.to_json() for s in stage.outputs])
    served = (session.get("inputs"), session.get("outputs"))
    if session.get("mode") != stage.mode or session.get("segment") != stage.name or \
            _spec_key(served) != _spec_key(expected):
        transport.close_session()
        raise ProtocolError(
            f"The server at {transport.base_url} serves segment '{session.get('segment')}' "
            f"({session.get('mode')}), inputs {_names(served[0])} -> outputs {_names(served[1])}; "
            f"this device's split expects '{stage.name}' ({stage.mode}), {_names(expected[0])} "
            f"-> {_names(expected[1])}. Serve and train the same split folder.")
    return session


def stage_segment(stage: Stage) -> Segment:
    """A server stage as the device sees it: one remote segment with the stage's interface."""
    return Segment(stage.name, "server", None, list(stage.inputs), list(stage.outputs))


def stage_urls(stages: Sequence[Stage], server_url: str | Mapping[str, str]) -> dict[str, str]:
    """The URL of each server stage's first server, by stage name."""
    if isinstance(server_url, str):
        if len(stages) != 1:
            names = ", ".join(f"{s.name}=URL" for s in stages)
            raise TrainingError(
                f"This split has {len(stages)} server stages ({[s.name for s in stages]}), each on its "
                f"own server: give one URL per stage, server_url={{...}} (CLI: --server {names}).")
        return {stages[0].name: server_url}
    urls = {}
    for stage in stages:
        url = server_url.get(stage.name) or server_url.get(stage.host)
        if not url:
            raise TrainingError(
                f"No server URL for the server stage '{stage.name}' (segments "
                f"{list(stage.segments)}): give it as {stage.name}=URL (server_url={{'{stage.name}': ...}}).")
        urls[stage.name] = url
    known = {stage.name for stage in stages} | {stage.host for stage in stages}
    unknown = sorted(set(server_url) - known)
    if unknown:
        raise TrainingError(f"server_url names {unknown}, which are not server stages of this split "
                            f"(stages: {sorted(s.name for s in stages)}).")
    return urls


def _spec_key(specs: Any) -> Any:
    return [[(s.get("name"), [d for d in s.get("shape", [])], s.get("dtype")) for s in group or []]
            for group in specs]


def _names(specs: Any) -> list[Any]:
    return [s.get("name") for s in specs or []]
