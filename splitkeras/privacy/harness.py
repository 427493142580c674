"""`train_in_process` and `audit`: train a split in process with the device's defences on,
the server stage recorded by a `ServerView`, then run the attacks on what it saw.

Each segment is a `SegmentRunner` in this process (the server's too), in the one step loop
(`splitkeras.steps.StepLoop`), so what the server stage receives is what a real server
would receive from `DeviceClient` with the same defences (the same wrappers, the same
order). Batches are drawn from a seeded permutation per epoch; the view's records are
matched with the samples of each step.

Example:
    >>> run = train_in_process(split, x, y, defences=[MaxNorm(seed=0)], epochs=5)   # doctest: +SKIP
    >>> report = audit(run, x_test, y_test, x_aux=x_aux, image_shape=(8, 8))          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from splitkeras.engine import SegmentRunner
from splitkeras.errors import TrainingError
from splitkeras.privacy.attacks.labels import binary_attacks, cluster_attack
from splitkeras.privacy.attacks.reconstruction import reconstruction_scores, save_pictures, train_decoder
from splitkeras.privacy.capture import ServerView
from splitkeras.privacy.defences.activations import ActivationNoise
from splitkeras.privacy.defences.base import apply_defences
from splitkeras.steps import StepLoop
from splitkeras.training import model_inputs_by_name

__all__ = ["InProcessRun", "train_in_process", "audit"]


@dataclass
class InProcessRun:
    """A trained split, its loop and what its server stage saw."""

    split: Any
    loop: StepLoop
    view: ServerView
    mode: str
    server_index: int
    defences: list[Any]
    indices: list[np.ndarray] = field(default_factory=list)  # the samples of each step
    losses: list[float] = field(default_factory=list)
    steps_per_epoch: int = 0

    def predict(self, x: Any, batch_size: int = 256) -> np.ndarray:
        out = []
        for begin in range(0, len(x), batch_size):
            store, _ = self.loop.infer(model_inputs_by_name(self.split, x[begin:begin + batch_size]))
            out.append(np.asarray(store[self.split.model_outputs[0].name]))
        return np.concatenate(out)

    def accuracy(self, x: Any, y: Any) -> float:
        """Test accuracy: argmax of a multi-unit output, `> 0.5` of a one-unit (sigmoid) one."""
        p = self.predict(x)
        guess = (p.reshape(len(p)) > 0.5).astype(int) if p.shape[-1] == 1 else np.argmax(p, -1)
        return float(np.mean(guess == np.asarray(y).reshape(len(y))))

    def activations(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """The head's (clean, inference-mode) activations for `x`, as sent: `[samples, features]`."""
        runners = self.loop.runners[:self.server_index]
        names = self.loop.runners[self.server_index].input_names
        rows = []
        for begin in range(0, len(x), batch_size):
            store, _ = self.loop.infer(model_inputs_by_name(self.split, x[begin:begin + batch_size]), runners)
            sent = [np.asarray(store[n]) for n in self.view.input_names if n in names]
            rows.append(np.concatenate([s.reshape(len(s), -1) for s in sent], 1))
        return np.concatenate(rows)


def train_in_process(split: Any, x: Any, y: Any, *, defences: Sequence[Any] = (), optimizer: Any = "adam",
                     loss: Any = None, metrics: Any = None, epochs: int = 1, batch_size: int = 32,
                     seed: int = 0, wire_dtype: str = "float32") -> InProcessRun:
    """Train `split` (one server stage of one segment) in process with `defences` on."""
    topology = split.topology
    stages = topology.stages
    servers = [i for i, s in enumerate(stages) if s.kind == "server"]
    if len(servers) != 1 or len(stages[servers[0]].segments) != 1:
        raise TrainingError("The privacy harness runs splits with one server segment (U-shaped or "
                            f"labels on the server); this one has stages {[s.segments for s in stages]}.")
    if loss is None:
        raise TrainingError("train_in_process needs a loss, e.g. loss='sparse_categorical_crossentropy'.")
    config = keras.optimizers.serialize(keras.optimizers.get(optimizer))
    model_inputs = [s.name for s in split.model_inputs]
    runners: list[Any] = [SegmentRunner.for_segment(split[s.name], config, model_inputs, jit_compile=False,
                                                    loss=loss if s.name == topology.label_segment else None,
                                                    metrics=metrics) for s in stages]
    label = runners[-1]
    view = ServerView(runners[servers[0]], wire_dtype)
    runners[servers[0]] = view
    wrapped = apply_defences(runners, [s.kind for s in stages], [s.mode for s in stages], list(defences),
                             model_inputs)
    loop = StepLoop(wrapped)
    run = InProcessRun(split, loop, view, stages[servers[0]].mode, servers[0], list(defences))
    x, y = np.asarray(x), np.asarray(y)
    label.build_labels(y[:1])
    random = np.random.default_rng(seed)
    step = 0
    for _ in range(epochs):
        order = random.permutation(len(x))
        batches = [order[i:i + batch_size] for i in range(0, len(x), batch_size)]
        run.steps_per_epoch = len(batches)
        for indices in batches:
            _, logs = loop.train(step, model_inputs_by_name(split, x[indices]), y[indices])
            run.indices.append(indices)
            run.losses.append(float(logs.get("loss", np.nan)))
            step += 1
    return run


def _label_report(run: InProcessRun, y: np.ndarray, classes: int) -> dict[str, float]:
    records = run.view.gradients if run.mode == "u_shaped" else run.view.sent_gradients
    grads = [run.view.stacked([r]) for r in records]
    labels = [y[i] for i in run.indices]
    report: dict[str, float] = {}
    if run.mode == "labels_on_server":  # what the server got as labels, against the truth
        received = np.concatenate([np.asarray(r).reshape(len(r), -1) for r in run.view.labels])
        ids = np.argmax(received, 1) if received.shape[1] > 1 else received[:, 0]
        report["labels_received_correct"] = float(np.mean(ids == np.concatenate(labels).reshape(-1)))
    if classes <= 2:
        counts = np.bincount(y.reshape(-1).astype(int), minlength=2)
        report.update(binary_attacks(grads, labels, positive=int(np.argmin(counts))))
    else:
        last = slice(len(grads) - run.steps_per_epoch, None)
        report.update(cluster_attack(np.concatenate(grads[last]), np.concatenate(labels[last]), classes))
    return report


def audit(run: InProcessRun, x_test: Any, y_test: Any, *, x_train: Any = None, y_train: Any = None,
          x_aux: Any = None, image_shape: tuple[int, ...] | None = None, value_range: float = 1.0,
          pictures: str | Path | None = None, decoder_epochs: int = 60, seed: int = 0,
          held_out: int = 500) -> dict[str, Any]:
    """Attack what `run`'s server saw: label inference (needs `y_train`, the device's
    labels, to score it) and, with `x_aux` (the attacker's data), input reconstruction of
    up to `held_out` device samples from the last epoch's activations (`x_train` scores
    it). Returns the figures, with the test accuracy."""
    report: dict[str, Any] = {"mode": run.mode, "defences": [repr(d) for d in run.defences],
                              "test_accuracy": run.accuracy(np.asarray(x_test), np.asarray(y_test))}
    if y_train is not None:
        y_train = np.asarray(y_train)
        classes = int(run.split.model_outputs[0].shape[-1] or 2)
        report["labels"] = _label_report(run, y_train, max(classes, 2))
    if x_aux is not None and x_train is not None:
        x_train, x_aux = np.asarray(x_train), np.asarray(x_aux)
        aux_activations = run.activations(x_aux)
        for defence in run.defences:  # the attacker knows the mechanism and adds the same noise
            if isinstance(defence, ActivationNoise):
                aux_activations = ActivationNoise(defence.clip, defence.sigma, seed=seed + 1).perturb(
                    [aux_activations])[0][0]
        decoder = train_decoder(aux_activations, x_aux, epochs=decoder_epochs, seed=seed)
        last = slice(len(run.indices) - run.steps_per_epoch, None)
        received = run.view.stacked(run.view.activations, last)[:held_out]
        samples = np.concatenate(run.indices[last])[:held_out]
        scores, guess = reconstruction_scores(decoder, received, x_train[samples], image_shape=image_shape,
                                              value_range=value_range, aux_mean=x_aux.mean(0))
        report["reconstruction"] = scores
        if pictures is not None and image_shape is not None:
            report["pictures"] = str(save_pictures(pictures, x_train[samples], guess, image_shape,
                                                   title=", ".join(report["defences"]) or "no defence"))
    return report
