"""The server segment of a split folder: loaded, run, checkpointed and saved back.

`SegmentHost` reads `split.json`, loads the one segment placed on the server, builds its
optimizer from the manifest's training config and its `SegmentRunner`; it writes and
resumes checkpoints (`server_app.checkpoint` is the file format) and writes the trained
segment back to its `.keras` file. `SegmentExecutor` is the `StepExecutor` that runs steps
on that runner. TensorFlow is imported when a host is built, not with this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server_app.checkpoint import load_checkpoint, save_checkpoint
from server_app.settings import ServerSettings
from server_app.step_machine import StepKey
from splitkeras.errors import ManifestError
from splitkeras.manifest import Manifest, atomic_write_bytes
from splitkeras.tensor_spec import TensorSpec

if TYPE_CHECKING:
    from splitkeras.engine import SegmentRunner

__all__ = ["SegmentHost", "SegmentExecutor"]


class SegmentHost:
    """Loads the server segment of `settings.split_dir` (see the module docstring)."""

    def __init__(self, settings: ServerSettings) -> None:
        from converters.keras_io import load_model
        from splitkeras.engine import SegmentRunner, new_optimizer
        from splitkeras.segments import Segment
        from splitkeras.training import restore_compile_value

        self.split_dir = Path(settings.split_dir)
        self.manifest = Manifest.read(self.split_dir)
        server = [s for s in self.manifest.segments if s.placement == "server"]
        if len(server) != 1:
            raise ManifestError(
                f"This server runs exactly one server segment; the split has {len(server)} "
                f"({[s.name for s in server]}). Re-split with one or two cuts, or set placements "
                "so that one segment is on the server."
            )
        self.entry = server[0]
        index = self.manifest.segments.index(self.entry)
        self.labels_on_server = index == len(self.manifest.segments) - 1
        self.mode = "labels_on_server" if self.labels_on_server else "u_shaped"
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
        model_inputs = {s.name for s in self.manifest.model_inputs}
        self.loss = restore_compile_value(training.get("loss")) if self.labels_on_server else None
        self.runner = SegmentRunner(
            self.segment, new_optimizer(optimizer_config),
            input_gradients=[s.name not in model_inputs for s in self.entry.inputs],
            jit_compile=settings.jit_compile,
            loss=self.loss,
            metrics=restore_compile_value(training.get("metrics")) if self.labels_on_server else None,
            loss_weights=training.get("loss_weights") if self.labels_on_server else None,
        )
        self.checkpoint_dir = settings.resolved_checkpoint_dir

    def _variables(self) -> tuple[list[Any], list[Any]]:
        return list(self.segment.model.variables), list(self.runner.optimizer.variables)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Assign the saved variables, if there is a checkpoint; returns its state (or None)."""
        return load_checkpoint(self.checkpoint_dir, *self._variables())

    def save_checkpoint(self, applied_steps: int, sessions: list[dict[str, Any]]) -> None:
        """Write variables, optimizer state, `applied_steps` and `sessions` atomically."""
        save_checkpoint(self.checkpoint_dir, *self._variables(),
                        {"applied_steps": applied_steps, "saved_at": time.time(),
                         "segment": self.entry.name, "sessions": sessions})

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


class SegmentExecutor:
    """The `StepExecutor` that runs each step on one segment's `SegmentRunner`."""

    def __init__(self, runner: SegmentRunner, input_specs: Sequence[TensorSpec]) -> None:
        self.runner = runner
        self.input_specs = list(input_specs)
        self._built = False

    def forward(self, key: StepKey, inputs: list[np.ndarray]) -> tuple[list[Any], float]:
        outputs = self.runner.forward(key, inputs)
        try:
            return outputs, float(self.runner.pending_regularization(key))
        except BaseException:
            self.runner.drop(key)
            raise

    def backward(self, key: StepKey, output_grads: list[np.ndarray]) -> list[Any | None]:
        return self.runner.backward(key, output_grads)

    def train(self, key: StepKey, inputs: list[np.ndarray], y: Any,
              sample_weight: np.ndarray | None) -> tuple[list[Any | None], dict[str, Any]]:
        if not self._built:
            self._build_label_model(y)
        # The metadata reports THIS step's loss and metrics (the device averages them per epoch, as
        # model.fit does), not running means over every device's steps since the server started.
        self.runner.model.reset_metrics()
        return self.runner.train_step(key, inputs, y, sample_weight)

    def predict(self, inputs: list[np.ndarray]) -> list[Any]:
        return self.runner.predict(inputs)

    def drop(self, key: StepKey) -> None:
        self.runner.drop(key)

    def _build_label_model(self, y: Any) -> None:
        import tensorflow as tf

        x = [np.zeros((1, *(d or 1 for d in s.sample_shape)), dtype=s.dtype) for s in self.input_specs]
        y1 = tf.nest.map_structure(lambda t: t[:1], y)
        self.runner.model._symbolic_build(data_batch=(x[0] if len(x) == 1 else x, y1, None))
        self._built = True
