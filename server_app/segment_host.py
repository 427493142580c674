"""The server segment of a split folder: loaded, run, checkpointed and saved back.

`SegmentHost` reads `split.json`, loads the server segment this server runs (the only one,
or `--segment NAME`), builds its optimizer from the manifest's training config and its
`SegmentRunner`; it writes and resumes checkpoints (`server_app.checkpoint` is the file
format) and writes the trained segment back to its `.keras` file. The steps run on
`server_app.chain.ChainExecutor` (this segment, and in a chain the next server).
TensorFlow is imported when a host is built, not with this module.
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server_app.checkpoint import load_checkpoint, save_checkpoint
from server_app.segment_choice import choose_segment
from server_app.settings import ServerSettings
from splitkeras.errors import ManifestError
from splitkeras.manifest import Manifest, atomic_write_bytes

if TYPE_CHECKING:
    pass

__all__ = ["SegmentHost"]


class SegmentHost:
    """Loads the server segment of `settings.split_dir` (see the module docstring)."""

    def __init__(self, settings: ServerSettings) -> None:
        from converters.keras_io import load_model
        from server_app.strategy import build_runner, strategy_scope
        from splitkeras.engine import SegmentRunner, new_optimizer
        from splitkeras.segments import Segment
        from splitkeras.training import restore_compile_value

        self.split_dir = Path(settings.split_dir)
        self.manifest = Manifest.read(self.split_dir)
        self.served = choose_segment(self.manifest, settings.segment, settings.next_url)
        self.entry = self.manifest.segment(self.served.segment)
        # this segment computes the loss only if it is the last; the chain may end with it later
        self.labels_on_server = self.entry.name == self.manifest.topology.label_segment
        self.mode = self.served.mode
        with strategy_scope(settings):  # under --strategy: mirrored variables
            model = load_model(self.split_dir / self.entry.keras_file, compile=False,
                               unsafe_deserialization=settings.unsafe_deserialization)
        self.segment = Segment(self.entry.name, "server", model, self.entry.inputs, self.entry.outputs)
        training = self.manifest.training or {}
        if not training.get("optimizer"):
            raise ManifestError(
                "split.json has no training config (the source model was not compiled). Compile "
                "the model before saving it, or edit split.json's \"training\" entry."
            )
        optimizer_config = training["optimizer"]
        if isinstance(optimizer_config, str):
            import keras

            optimizer_config = keras.optimizers.serialize(keras.optimizers.get(optimizer_config))
        # the labels a train body carries are checked against the loss (class ids in range)
        self.loss = restore_compile_value(training.get("loss")) if self.served.holds_labels else None
        if settings.strategy != "off":
            with strategy_scope(settings):
                self.runner: Any = build_runner(settings, self.segment, new_optimizer(optimizer_config),
                                                [s.name for s in self.manifest.model_inputs],
                                                self.labels_on_server)
        else:
            self.runner = SegmentRunner.for_segment(
                self.segment, optimizer_config, [s.name for s in self.manifest.model_inputs],
                jit_compile=settings.jit_compile, loss=self.loss if self.labels_on_server else None,
                metrics=restore_compile_value(training.get("metrics")),
                loss_weights=training.get("loss_weights"))
        self.checkpoint_dir = settings.resolved_checkpoint_dir
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """A process killed inside an atomic write leaves its temporary file behind (the target
        itself is intact): remove them at start."""
        stale = list(self.checkpoint_dir.glob(".*.tmp")) if self.checkpoint_dir.is_dir() else []
        target = self.split_dir / self.entry.keras_file
        stale += [p for p in [target.with_name(f".{target.stem}.saving.keras")] if p.exists()]
        for path in stale:
            try:
                path.unlink()
            except OSError:
                pass

    def _variables(self) -> tuple[list[Any], list[Any]]:
        return list(self.segment.model.variables), list(self.runner.optimizer.variables)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Assign the saved variables, if there is a checkpoint; returns its state (or None).
        An unreadable checkpoint, or one of another segment, is a one-line `ManifestError`."""
        try:
            state = load_checkpoint(self.checkpoint_dir, *self._variables())
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as error:
            raise ManifestError(f"The checkpoint in '{self.checkpoint_dir}' cannot be read "
                                f"({type(error).__name__}: {str(error).strip()[:200]}). Move it away to start "
                                "fresh, or put back a good copy.") from None
        saved_segment = (state or {}).get("segment")
        if saved_segment is not None and saved_segment != self.entry.name:
            raise ManifestError(f"The checkpoint in '{self.checkpoint_dir}' belongs to segment '{saved_segment}', "
                                f"not '{self.entry.name}'. Give this segment its own --checkpoint-dir, or move "
                                "the checkpoint away to start fresh.")
        return state

    def save_checkpoint(self, applied_steps: int, sessions: list[dict[str, Any]],
                        downstream: dict[str, Any] | None = None, wal_seq: int = 0,
                        guard: dict[str, Any] | None = None, distributed: dict[str, Any] | None = None) -> None:
        """Write variables, optimizer state, `applied_steps`, `sessions`, (in a chain) each
        session's session on the next server, the last log record it includes and the guard's
        running scales (under `--strategy`, the cluster's applied updates), atomically."""
        save_checkpoint(self.checkpoint_dir, *self._variables(),
                        {"applied_steps": applied_steps, "saved_at": time.time(),
                         "segment": self.entry.name, "sessions": sessions,
                         "downstream": downstream or {}, "wal_seq": wal_seq, "guard": guard or {},
                         **({"distributed": distributed} if distributed is not None else {})})

    def save_segment(self) -> None:
        """Write the trained segment back to its `.keras` file in the split folder (atomic)."""
        target = self.split_dir / self.entry.keras_file
        temporary = target.with_name(f".{target.stem}.saving.keras")
        self.segment.model.save(temporary)
        os.replace(temporary, target)

    def checkpoint_dir_writable(self) -> bool:
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            probe = self.checkpoint_dir / f".probe-{os.getpid()}"
            atomic_write_bytes(probe, b"ok")
            probe.unlink()
            return True
        except OSError:
            return False
