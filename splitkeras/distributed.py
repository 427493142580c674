"""The server segment on `tf.distribute`: one host's accelerators, or several hosts.

`start(kind)` creates the strategy at program start (before any other TensorFlow op, as
`MultiWorkerMirroredStrategy` requires): `"mirrored"` over every local accelerator (or
`replicas` logical CPU devices when there is none, for tests), `"multi-worker"` from
`TF_CONFIG` with a collective timeout, so a dead peer is an error and not a hang.

`DistributedRunner` has the step interface of `splitkeras.engine.SegmentRunner` (forward,
backward, drop, has_pending, predict, ...), so the server hands it a device's batch, or a
micro-batch group's union, unchanged:

* `forward(key, inputs)`: the batch is split across this worker's replicas
  (`np.array_split`, uneven shards allowed); each replica runs the segment under its own
  tape, kept until `backward(key)`. The outputs are the shards' outputs, concatenated.
* `backward(key, output_grads, gradient_scale=1.0)`: each replica's VJP with its share of
  the output gradients (the regularization's seed only on replica 0, so it counts once per
  step); the sum over replicas is the union batch's gradient. Then ONE global step: the
  workers all-reduce how many device steps they hold (a count; 0 on an idle tick) and, if
  the total is > 0, the SUM of their weight gradients; every replica applies the same
  update (gradient / total steps), so the mirrored weights stay identical.

Keras 3's TensorFlow optimizer all-reduces the gradients itself when `apply` runs in a
replica context (`keras/src/backend/tensorflow/optimizer.py`, `_all_reduce_sum_gradients`),
AFTER clipping them per replica. Here the runner all-reduces first and the optimizer's own
all-reduce is turned off on this optimizer instance, so clipnorm/clipvalue see the whole
step's gradient, as on one device, and nothing is reduced twice.

Refused: BatchNormalization (its statistics would be per replica, unlike one device's),
activity regularizers (their loss is per batch), a segment that holds the labels, and
the guards (not run under a strategy yet). See docs/scaling.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitkeras.errors import RequestRefused, TrainingError

__all__ = ["STRATEGIES", "start", "current", "DistributedRunner", "check_segment"]

STRATEGIES = ("mirrored", "multi-worker")
log = logging.getLogger("splitkeras.server")
_started: dict[str, Any] = {}  # kind -> the strategy this process created


def start(kind: str, replicas: int | None = None, timeout_seconds: float = 30.0) -> Any:
    """Create this process's strategy (once; later calls return it).

    Args:
        kind: `"mirrored"` or `"multi-worker"`.
        replicas: mirrored only: how many devices (default: every local GPU, else 1 CPU).
            On a machine without GPUs, N logical CPU devices are made (before TensorFlow
            initializes its devices).
        timeout_seconds: multi-worker: how long a collective waits for a peer.

    Example:
        >>> strategy = start("mirrored", replicas=2)  # doctest: +SKIP
    """
    if kind in _started:
        return _started[kind]
    if _started:
        raise TrainingError(f"This process already runs the '{next(iter(_started))}' strategy; one per process.")
    import tensorflow as tf

    if kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(_mirrored_devices(tf, replicas))
    elif kind == "multi-worker":
        _check_tf_config()
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_seconds)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    else:
        raise TrainingError(f"Unknown strategy '{kind}': use one of {list(STRATEGIES)}.")
    _started[kind] = strategy
    return strategy


def current() -> Any | None:
    """The strategy `start` created in this process, or None."""
    return next(iter(_started.values()), None)


def _mirrored_devices(tf: Any, replicas: int | None) -> list[str]:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas is not None and replicas > len(gpus):
            raise TrainingError(f"--replicas {replicas}: this machine has {len(gpus)} GPU(s). Give at most "
                                f"{len(gpus)}, or leave --replicas out to use them all.")
        return [f"/gpu:{i}" for i in range(replicas or len(gpus))]
    count = replicas or 1
    cpu = tf.config.list_physical_devices("CPU")[0]
    if count > 1:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:  # TensorFlow's devices are initialized: only the count it has
            have = len(tf.config.list_logical_devices("CPU"))
            if have < count:
                raise TrainingError(f"--replicas {count}: TensorFlow was initialized with {have} CPU device(s) "
                                    "before the strategy was made. Start the strategy first "
                                    "(splitkeras.distributed.start at program start).") from None
    return [f"/cpu:{i}" for i in range(count)]


def _check_tf_config() -> None:
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise TrainingError("--strategy multi-worker needs TF_CONFIG, the cluster as TensorFlow expects it, e.g. "
                            "TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:2222\", \"host2:2222\"]}, "
                            "\"task\": {\"type\": \"worker\", \"index\": 0}}'.")
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        index = int(config["task"]["index"])
        if config["task"]["type"] != "worker" or not 0 <= index < len(workers):
            raise ValueError("task")
    except (ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"TF_CONFIG is not a cluster TensorFlow can use ({type(error).__name__}: {error}): "
                            "it needs cluster.worker (a list of host:port) and task {\"type\": \"worker\", "
                            "\"index\": i} with i in range.") from None


def check_segment(model: Any, holds_labels: bool) -> None:
    """Refuse what a strategy would not compute as one device does (see the module docstring)."""
    import keras

    if holds_labels:
        raise TrainingError("--strategy runs a segment that does not hold the labels (a U-shaped split); this "
                            "one computes the loss. Split so that the labels stay on the device, or serve it "
                            "without --strategy.")
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            raise TrainingError(f"Layer '{layer.name}' is a BatchNormalization: under --strategy its statistics "
                                "would be computed per replica, not over the step's batch as on one device. "
                                "Serve this segment without --strategy, or cut so that it runs on the device.")
        if getattr(layer, "activity_regularizer", None) is not None:
            raise TrainingError(f"Layer '{layer.name}' has an activity regularizer, whose loss is per batch and "
                                "would differ per replica. Serve this segment without --strategy.")


def _keep_reduced(grads_and_vars: Any) -> list[Any]:
    """The optimizer's own all-reduce, off: the runner hands it gradients already reduced."""
    return list(grads_and_vars)


@dataclass
class _Shard:
    tape: Any
    inputs: list[Any]
    outputs: list[Any]
    regularization: Any


_LOST = ("DeadlineExceededError", "UnavailableError", "CancelledError", "AbortedError", "InternalError")


class DistributedRunner:
    """A segment's steps on a `tf.distribute` strategy (see the module docstring).

    The model and the optimizer must have been made under `strategy.scope()`.

    Example:
        >>> with strategy.scope():                                              # doctest: +SKIP
        ...     runner = DistributedRunner(segment, new_optimizer(config), strategy=strategy)
        >>> outputs = runner.forward(0, [activation])                           # doctest: +SKIP
        >>> input_grads = runner.backward(0, [grad_of_outputs])                 # doctest: +SKIP
    """

    def __init__(self, segment: Any, optimizer: Any, *, strategy: Any,
                 input_gradients: Sequence[bool] | None = None) -> None:
        import tensorflow as tf

        from splitkeras.engine import as_list  # TensorFlow's modules load after start()

        check_segment(segment.model, holds_labels=False)
        self.segment, self.model, self.optimizer, self.strategy = segment, segment.model, optimizer, strategy
        self.guard = None
        self.holds_labels = False
        self.input_names = [s.name for s in segment.inputs]
        self.output_names = [s.name for s in segment.outputs]
        self.input_dtypes = [s.dtype for s in segment.inputs]
        wanted = input_gradients if input_gradients is not None else [True] * len(self.input_names)
        self.input_gradients = [bool(n) and np.dtype(d).kind == "f" for n, d in zip(wanted, self.input_dtypes)]
        self.trainable = list(self.model.trainable_variables)
        with strategy.scope():
            optimizer.build(self.trainable)
        optimizer._all_reduce_sum_gradients = _keep_reduced
        self.local_replicas = len(strategy.extended.worker_devices)
        self.replicas = int(strategy.num_replicas_in_sync)
        self.workers = self.replicas // self.local_replicas
        resolver = getattr(strategy, "cluster_resolver", None)
        self.worker_index = int(getattr(resolver, "task_id", 0) or 0) if self.workers > 1 else 0
        self.lost: str | None = None  # why a global step failed (a peer died): every step is refused
        self.global_steps = 0  # global steps run (idle ticks included)
        self.applied_updates = 0  # global steps that applied an update
        self.lock = threading.Lock()  # one global step at a time (the writer and the idle ticker)
        self._pending: dict[Any, dict[int, _Shard]] = {}
        self._predict_fn = tf.function(lambda x: as_list(self.model(x, training=False)))

    # ---- sharding ----------------------------------------------------------------------------
    def _local_index(self) -> int:
        import tensorflow as tf

        replica = tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group)
        return int(replica) - self.worker_index * self.local_replicas

    def _distribute(self, arrays: Sequence[Any], dtypes: Sequence[Any] | None = None) -> Any:
        import tensorflow as tf

        shards = [np.array_split(np.asarray(a, dtype=d) if d else np.asarray(a), self.local_replicas)
                  for a, d in zip(arrays, dtypes or [None] * len(arrays))]

        def value(context: Any) -> list[Any]:
            local = context.replica_id_in_sync_group - self.worker_index * self.local_replicas
            return [tf.constant(s[local]) for s in shards]

        return self.strategy.experimental_distribute_values_from_function(value)

    def _local(self, per_replica: Any) -> list[Any]:
        return list(self.strategy.experimental_local_results(per_replica))

    def _replica(self, structure: Any, index: int) -> Any:
        """Local replica `index`'s part of what `strategy.run` returned."""
        import tensorflow as tf

        return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[index], structure)

    def _check_alive(self) -> None:
        if self.lost is not None:
            raise RequestRefused("worker_lost", f"A worker of this server's cluster is lost ({self.lost}); no step "
                                 "can be applied. Restart every worker of the cluster (they resume from the "
                                 "checkpoint), then resend the step.")

    # ---- the step interface of SegmentRunner ---------------------------------------------------
    def forward(self, step: Any, inputs: Sequence[Any]) -> list[Any]:
        """Training-mode forward of `step`, split across the local replicas; keeps their tapes."""
        import tensorflow as tf

        from splitkeras.engine import as_list

        self._check_alive()
        if len(inputs) != len(self.input_names):
            raise TrainingError(f"Segment '{self.segment.name}' takes {len(self.input_names)} inputs "
                                f"{self.input_names}, received {len(inputs)}.")
        shards: dict[int, _Shard] = {}
        variables = [v.value for v in self.trainable]

        def run(xs: list[Any]) -> list[Any]:
            index = self._local_index()
            watched = [x for x, need in zip(xs, self.input_gradients) if need]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(variables)
                tape.watch(watched)
                outputs = as_list(self.model(xs[0] if len(xs) == 1 else xs, training=True))
                losses = [tf.reduce_sum(tf.cast(loss, tf.float32)) for loss in self.model.losses]
                regularization = tf.add_n(losses) if losses else tf.zeros((), tf.float32)
            shards[index] = _Shard(tape, xs, outputs, regularization)
            return outputs

        self.strategy.run(run, args=(self._distribute(inputs, self.input_dtypes),))
        self._pending[step] = shards
        return [tf.concat([shards[i].outputs[o] for i in range(self.local_replicas)], axis=0)
                for o in range(len(self.output_names))]

    def pending_regularization(self, step: Any) -> Any:
        return self._pending[step][0].regularization

    def has_pending(self, step: Any) -> bool:
        return step in self._pending

    def drop(self, step: Any) -> None:
        self._pending.pop(step, None)

    def backward(self, step: Any, output_gradients: Sequence[Any], gradient_scale: float = 1.0) -> list[Any]:
        """The update of `step` (one global step), then one gradient per input (None: not needed).
        `gradient_scale` scales the weight gradient (a micro-batch of K device steps: 1/K)."""
        import tensorflow as tf

        self._check_alive()
        shards = self._pending.get(step)
        if shards is None:
            raise TrainingError(f"Segment '{self.segment.name}' has no forward pass for step {step!r} to "
                                "differentiate. Run forward(step, ...) first.")
        if len(output_gradients) != len(self.output_names):
            raise TrainingError(f"Segment '{self.segment.name}' has {len(self.output_names)} outputs "
                                f"{self.output_names}, received {len(output_gradients)} gradients.")
        del self._pending[step]
        variables = [v.value for v in self.trainable]

        def vjp(gs: list[Any]) -> tuple[list[Any], list[Any]]:
            index = self._local_index()
            shard = shards[index]
            seeds = [tf.cast(g, o.dtype) for g, o in zip(gs, shard.outputs)]
            seeds.append(tf.ones_like(shard.regularization) if index == 0 else tf.zeros_like(shard.regularization))
            watched = [x for x, need in zip(shard.inputs, self.input_gradients) if need]
            grads = shard.tape.gradient(shard.outputs + [shard.regularization], variables + watched,
                                        output_gradients=seeds)
            weight = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in
                      zip(grads[: len(variables)], variables)]
            return weight, list(grads[len(variables):])

        grads = [np.asarray(g) for g in output_gradients]
        weight, watched = self.strategy.run(vjp, args=(self._distribute(grads),))
        steps = 1.0 / gradient_scale
        self.global_step(weight, float(round(steps)) if abs(steps - round(steps)) < 1e-9 else steps, gradient_scale)
        per_input: list[Any] = []
        replicas = [self._replica(watched, i) for i in range(self.local_replicas)]
        for need in self.input_gradients:
            per_input.append(tf.concat([r[len([p for p in per_input if p is not None])] for r in replicas], axis=0)
                             if need else None)
        return per_input

    # ---- the global step -------------------------------------------------------------------------
    def global_step(self, weight_gradients: Any = None, steps: float = 0.0, scale: float = 1.0) -> float:
        """One global step: all-reduce the count of device steps (`steps`, 0 on an idle tick),
        then, if the total is > 0, the weight gradients' SUM; apply it / total on every replica.
        Every worker calls this in the same order (the k-th calls pair up). Returns the total.
        On one worker there is no count: the gradient is multiplied by `scale` (1/K for a
        micro-batch of K device steps), as `SegmentRunner.backward(..., gradient_scale)` does."""
        import tensorflow as tf

        with self.lock:
            self._check_alive()
            try:
                return self._global_step(tf, weight_gradients, steps, scale)
            except tf.errors.OpError as error:
                if type(error).__name__ not in _LOST:
                    raise
                self.lost = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
                log.error("Global step %d failed, a worker is lost: %s", self.global_steps, self.lost)
                self._check_alive()
                raise

    def _global_step(self, tf: Any, weight_gradients: Any, steps: float, scale: float) -> float:
        self.global_steps += 1
        total = float(steps)
        if self.workers > 1:
            counts = self.strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                "sum", tf.constant(steps if self._local_index() == 0 else 0.0, tf.float32)))
            total = float(self._local(counts)[0])
        if total <= 0:
            return total
        if weight_gradients is None:  # an idle worker joins with zeros
            weight_gradients = self.strategy.run(lambda: [tf.zeros_like(v.value) for v in self.trainable])
        alone = self.workers == 1

        def apply(grads: list[Any]) -> None:
            reduced = tf.distribute.get_replica_context().all_reduce("sum", grads)
            if alone and scale != 1.0:
                reduced = [g * tf.cast(scale, g.dtype) for g in reduced]
            elif not alone and total != 1.0:
                reduced = [g / tf.cast(total, g.dtype) for g in reduced]
            self.optimizer.apply(reduced, self.trainable)

        self.strategy.run(apply, args=(weight_gradients,))
        self.applied_updates += 1
        return total

    # ---- inference, and the weights of every replica ------------------------------------------
    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return self.predict_with_regularization(inputs)[0]

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        import tensorflow as tf

        xs = [tf.convert_to_tensor(v, dtype=d) for v, d in zip(inputs, self.input_dtypes)]
        outputs = self._predict_fn(xs[0] if len(xs) == 1 else xs)
        losses = [tf.reduce_sum(tf.cast(loss, tf.float32)) for loss in self.model.losses]
        return list(outputs), tf.add_n(losses) if losses else tf.zeros((), tf.float32)

    def replica_weights(self) -> list[list[np.ndarray]]:
        """Each local replica's copy of the trainable weights (they must be identical)."""
        return [[np.asarray(c.numpy()) for c in v.value.values] for v in self.trainable]

    def sync_from_latest(self) -> int:
        """After each worker loaded its own checkpoint (`applied_updates` set from it): every
        worker takes the variables of the one with the most applied updates (the lowest index on a
        tie), by an all-reduce where the others add zeros (x + 0 is x). Returns that worker's index."""
        import tensorflow as tf

        if self.workers <= 1:
            return self.worker_index
        mine = np.zeros(self.workers, np.float64)
        mine[self.worker_index] = self.applied_updates

        def gather() -> Any:
            value = tf.constant(mine if self._local_index() == 0 else np.zeros_like(mine))
            return tf.distribute.get_replica_context().all_reduce("sum", value)

        with self.lock:
            counts = np.asarray(self._replica(self.strategy.run(gather), 0))
        source = int(np.argmax(counts))
        self.applied_updates = int(counts[source])
        variables = [v.value for v in self.model.variables] + [v.value for v in self.optimizer.variables]
        keep = self.worker_index == source

        def run() -> list[Any]:
            values = [tf.identity(v) if keep else tf.zeros_like(v) for v in variables]
            return tf.distribute.get_replica_context().all_reduce("sum", values)

        with self.lock:
            chosen = self._replica(self.strategy.run(run), 0)
            for variable, value in zip(variables, chosen):
                variable.assign(value)  # cross-replica: every local copy
        return source
