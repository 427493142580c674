"""Which server segment a `splitkeras serve` process runs, and whether it needs `--next`.

Pure topology (no TensorFlow), so `splitkeras serve` checks its flags in one line before
it loads anything.
"""

from __future__ import annotations

from typing import Any

from splitkeras.errors import ManifestError
from splitkeras.topology import Served

__all__ = ["choose_segment"]


def choose_segment(manifest: Any, segment: str | None, next_url: str | None) -> Served:
    """What this server serves: `segment`, or the split's only server segment.

    Raises:
        ManifestError: no server segment; several and none chosen; a device segment or an
            unknown name; a chain's server without `--next`, or `--next` without a chain.
    """
    topology = manifest.topology
    servers = topology.server_segments
    if not servers:
        raise ManifestError("This split has no server segment (every segment runs on the device): "
                            "re-split with --placement naming a server, or train it in process.")
    if segment is None:
        if len(servers) > 1:
            raise ManifestError(
                f"This split has {len(servers)} server segments ({', '.join(servers)}): serve each in "
                f"its own process, with --segment NAME (e.g. --segment {servers[0]}).")
        segment = servers[0]
    elif segment not in topology.names:
        raise ManifestError(f"The split has no segment named '{segment}' (server segments: "
                            f"{', '.join(servers)}).")
    served = topology.served(segment)
    if served.next is not None and not next_url:
        raise ManifestError(
            f"Segment '{segment}' is followed by server segment '{served.next}' in a chain: give the "
            f"URL of the server of '{served.next}' with --next URL.")
    if served.next is None and next_url:
        raise ManifestError(f"Segment '{segment}' is not followed by another server segment: --next is "
                            "only for a chain (placements such as device,server,server,device).")
    return served
