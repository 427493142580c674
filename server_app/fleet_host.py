"""The device segments on the server, for rounds of aggregation (`--aggregate`).

`FleetHost` loads the device segments' `.keras` files of the split folder (their weights are
round 0's global device weights), builds the `DeviceAggregator` and takes back its saved
rounds (`fleet.npz` in the checkpoint folder). At shutdown it writes the global device
weights back into those files (and re-exports the TF.js bundles the manifest names), so
that `splitkeras join OUT` gives the model the whole fleet trained.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server_app.aggregation import FLEET_FILE, DeviceAggregator
from server_app.settings import ServerSettings
from server_app.wal import Record
from splitkeras import fleet
from splitkeras.errors import ManifestError
from splitkeras.manifest import Manifest

__all__ = ["FleetHost"]


class FleetHost:
    """The device segments of `manifest` and their rounds (see the module docstring)."""

    def __init__(self, settings: ServerSettings, manifest: Manifest, checkpoint_dir: Path,
                 journal: Callable[[Record], None], clock: Callable[[], float]) -> None:
        from converters.keras_io import load_model

        self.split_dir = Path(settings.split_dir)
        self.manifest = manifest
        self.entries = [e for e in manifest.segments if e.placement == "device"]
        self.models: list[tuple[str, Any]] = [
            (e.name, load_model(self.split_dir / e.keras_file, compile=False,
                                unsafe_deserialization=settings.unsafe_deserialization))
            for e in self.entries]
        self.aggregator = DeviceAggregator(
            settings.aggregate, fleet.device_weights(self.models), round_steps=settings.round_steps,
            quorum=settings.round_quorum, deadline_seconds=settings.round_deadline_seconds,
            norm_factor=settings.round_norm_factor, max_weight=settings.guard_max_weight,
            journal=journal, clock=clock)
        try:
            self.aggregator.load(checkpoint_dir)
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise ManifestError(f"The rounds in '{checkpoint_dir / FLEET_FILE}' cannot be taken back "
                                f"({str(error).strip()[:200]}). Move the file away to start the rounds "
                                "fresh.") from None

    def save_segments(self) -> list[Path]:
        """Write the global device weights into the device segments' files (atomic), and
        re-export their TF.js bundles. Returns the paths written."""
        from converters import replace_tfjs_bundle

        fleet.assign_device_weights(self.models, self.aggregator.global_weights)
        written = []
        for entry, (_, model) in zip(self.entries, self.models):
            target = self.split_dir / entry.keras_file
            temporary = target.with_name(f".{target.stem}.saving.keras")
            model.save(temporary)
            os.replace(temporary, target)
            written.append(target)
            if entry.tfjs:
                written.append(replace_tfjs_bundle(model, self.split_dir / entry.tfjs))
        return written
