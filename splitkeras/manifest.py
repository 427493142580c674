"""`split.json`: the contract between the segments, the server and the device.

The schema is versioned and documented in `splitkeras/schema/split-manifest-v2.json`
(JSON Schema) and `docs/manifest.md`. Version 2 adds each segment's `host` (which
server runs it); version 1 files still load (hosts derived: see `splitkeras.topology`).
Readers refuse a manifest whose `format_version` they do not know.

Example:
    >>> manifest = Manifest.read("out/split.json")      # doctest: +SKIP
    >>> [s.name for s in manifest.segments]              # doctest: +SKIP
    ['head', 'middle', 'tail']
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitkeras.errors import ManifestError
from splitkeras.tensor_spec import TensorSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "PLACEMENTS", "Manifest", "SegmentEntry", "atomic_write_bytes"]

FORMAT = "splitkeras.split"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PLACEMENTS = ("device", "server")
MANIFEST_NAME = "split.json"


@dataclass
class SegmentEntry:
    """One segment as `split.json` describes it."""

    name: str
    placement: str
    keras_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int = 0
    tfjs: str | None = None  # relative path of the TF.js model.json (device segments)
    host: str | None = None  # the server that runs a server segment; None: its own name

    def __post_init__(self) -> None:
        from splitkeras.topology import default_host

        if self.host is None:
            self.host = default_host(self)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "placement": self.placement,
            "host": self.host,
            "keras_file": self.keras_file,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "parameters": self.parameters,
        }
        if self.tfjs is not None:
            data["tfjs"] = self.tfjs
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentEntry:
        return cls(
            name=str(data["name"]),
            placement=str(data["placement"]),
            keras_file=str(data["keras_file"]),
            inputs=[TensorSpec.from_json(s) for s in data["inputs"]],
            outputs=[TensorSpec.from_json(s) for s in data["outputs"]],
            parameters=int(data.get("parameters", 0)),
            tfjs=data.get("tfjs"),
            host=data.get("host"),
        )


@dataclass
class Manifest:
    """The parsed `split.json`."""

    source: dict[str, Any]
    cuts: list[str]
    model_inputs: list[TensorSpec]
    model_outputs: list[TensorSpec]
    segments: list[SegmentEntry]
    training: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def segment(self, name: str) -> SegmentEntry:
        for entry in self.segments:
            if entry.name == name:
                return entry
        names = ", ".join(s.name for s in self.segments)
        raise ManifestError(f"The split has no segment named '{name}' (segments: {names}).")

    @property
    def label_segment(self) -> SegmentEntry:
        """The segment that holds the labels and computes the loss: the last one."""
        return self.segments[-1]

    def to_json(self) -> dict[str, Any]:
        from splitkeras import __version__

        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "splitkeras_version": __version__,
            "source": self.source,
            "cuts": self.cuts,
            "model_inputs": [s.to_json() for s in self.model_inputs],
            "model_outputs": [s.to_json() for s in self.model_outputs],
            "segments": [s.to_json() for s in self.segments],
            "training": self.training,
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(
                f"This is not a splitkeras manifest (expected \"format\": \"{FORMAT}\"). "
                "Create one with `splitkeras split MODEL --at LAYER`."
            )
        version = data.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ManifestError(
                f"Manifest format_version {version!r} is not supported by this splitkeras "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}). Re-create the "
                "split with this version."
            )
        known = {"format", "format_version", "splitkeras_version", "source", "cuts",
                 "model_inputs", "model_outputs", "segments", "training"}
        try:
            manifest = cls(
                source=dict(data["source"]),
                cuts=[str(c) for c in data["cuts"]],
                model_inputs=[TensorSpec.from_json(s) for s in data["model_inputs"]],
                model_outputs=[TensorSpec.from_json(s) for s in data["model_outputs"]],
                segments=[SegmentEntry.from_json(s) for s in data["segments"]],
                training=data.get("training"),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except KeyError as error:
            raise ManifestError(
                f"Malformed split manifest: the field {error} is missing. See docs/manifest.md, "
                "or re-create the split with `splitkeras split`."
            ) from None
        except (TypeError, ValueError) as error:
            raise ManifestError(
                f"Malformed split manifest: a field has an invalid value ({error}). See "
                "docs/manifest.md, or re-create the split with `splitkeras split`."
            ) from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check that every segment input is produced earlier or is a model input."""
        if len(self.segments) < 2:
            raise ManifestError("A split manifest needs at least two segments.")
        if len(self.cuts) != len(self.segments) - 1:
            raise ManifestError(
                f"The manifest lists {len(self.cuts)} cut(s) for {len(self.segments)} segments; "
                "expected one cut fewer than segments."
            )
        for entry in self.segments:
            if entry.placement == "device" and entry.host != "device":
                raise ManifestError(f"Device segment '{entry.name}' has host '{entry.host}'; a device "
                                    "segment's host is \"device\".")
        available = {s.name for s in self.model_inputs}
        names = set()
        for entry in self.segments:
            if entry.placement not in PLACEMENTS:
                raise ManifestError(
                    f"Segment '{entry.name}' has placement '{entry.placement}'; expected one of {PLACEMENTS}."
                )
            if entry.name in names:
                raise ManifestError(f"Segment name '{entry.name}' appears twice.")
            names.add(entry.name)
            for spec in entry.inputs:
                if spec.name not in available:
                    raise ManifestError(
                        f"Segment '{entry.name}' takes '{spec.name}', which no earlier segment "
                        "produces and which is not a model input."
                    )
            available.update(s.name for s in entry.outputs)
        missing = [s.name for s in self.model_outputs if s.name not in available]
        if missing:
            raise ManifestError(f"No segment produces the model outputs {missing}.")
        _ = self.topology  # the placement rules (first segment on the device, ...)

    @property
    def topology(self) -> Any:
        """The split's shape (`splitkeras.topology.Topology`), derived from the segments."""
        from splitkeras.topology import Topology

        return Topology.from_manifest(self)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read `split.json` from a file or from the split folder that holds it."""
        path = Path(path)
        if path.suffix != ".json":  # a split folder, as the CLI takes it
            path = path / MANIFEST_NAME
        if not path.exists():
            raise ManifestError(
                f"No split manifest at '{path}'. Create one with "
                f"`splitkeras split MODEL --at LAYER -o {path.parent}`."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"Cannot read split manifest '{path}': {error}.") from None
        return cls.from_json(data)

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / MANIFEST_NAME
        text = json.dumps(self.to_json(), indent=2) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))
        return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
