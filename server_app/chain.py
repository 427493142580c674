"""What a server runs for one step: its own segment and, in a chain, the rest of it.

A chain is a run of consecutive server segments (device -> edge -> cloud). The device
talks to the chain's first server; each server runs its own segment and hands what the
rest of the chain needs to the next server (`splitkeras serve --next URL`), as a device
would: through `splitkeras.client.Transport`, with its retries and recoveries. So the
activations and gradients between servers never travel to the phone, and the server
side is driven by the same `splitkeras.steps.StepLoop` as the device and the in-process
trainer: `[this segment, the next server]` walked by tensor names.

Each device session gets its own session on the next server (opened with the first
step), so step numbers, retries and exactly-once hold hop by hop: a retry at any hop
returns the same bytes and applies nothing twice. The next server's session is saved
with this server's checkpoint, so a restarted server carries on in the same downstream
session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from splitkeras.steps import StepLoop
from splitkeras.tensor_spec import TensorSpec
from splitkeras.topology import Served

if TYPE_CHECKING:  # the client's runner imports TensorFlow: loaded with the first chain session
    from splitkeras.client.remote import RemoteSegment
    from splitkeras.client.transport import Transport

__all__ = ["ChainExecutor"]

_SESSION = b"session:"  # a logged blob that names a downstream session


class _LabelRunner:
    """This server's `SegmentRunner` when it holds the labels: the label model is built on the
    first batch, and each step reports ITS loss and metrics (the device averages them per
    epoch, as model.fit does), not running means over every device's steps."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.holds_labels = True

    def train_step(self, key: Any, inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        self.runner.build_labels(y)
        self.runner.model.reset_metrics()
        return self.runner.train_step(key, inputs, y, sample_weight, other_losses)

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        return self.runner.predict_with_regularization(inputs)

    def drop(self, key: Any) -> None:
        self.runner.drop(key)


class _NextServer:
    """The rest of the chain, on the next server: the loop's (session id, step) keys become
    the device-style step numbers of this device session's downstream session."""

    def __init__(self, remote: RemoteSegment) -> None:
        self.remote = remote
        self.input_names, self.output_names = remote.input_names, remote.output_names
        self.holds_labels = remote.holds_labels

    def forward(self, key: tuple[str, int], inputs: Sequence[Any]) -> list[Any]:
        return self.remote.forward(key[1], inputs)

    def pending_regularization(self, key: tuple[str, int]) -> Any:
        return self.remote.pending_regularization(key[1])

    def backward(self, key: tuple[str, int], output_gradients: Sequence[Any]) -> list[Any]:
        return self.remote.backward(key[1], output_gradients)

    def train_step(self, key: tuple[str, int], inputs: Sequence[Any], y: Any, sample_weight: Any = None,
                   other_losses: Any = 0.0) -> tuple[list[Any], dict[str, Any]]:
        return self.remote.train_step(key[1], inputs, y, sample_weight, other_losses)

    def predict_with_regularization(self, inputs: Sequence[Any]) -> tuple[list[Any], Any]:
        return self.remote.predict_with_regularization(inputs)

    def drop(self, key: tuple[str, int]) -> None:
        self.remote.drop(key[1])


class _Recorder:
    """The transport to the next server, as the `RemoteSegment` sees it: live, each answer is
    kept (as a tensor body) for this server's write-ahead log; while the log is replayed at
    start, the answers come from the log instead of the network."""

    def __init__(self, transport: Transport, executor: ChainExecutor) -> None:
        self.transport, self.executor = transport, executor

    def _answer(self, call: Callable[[], Any], has_metadata: bool) -> Any:
        from splitkeras import wire

        feed = self.executor._feed
        if feed is not None:  # replaying: the next server already did this
            tensors, metadata = wire.decode(feed.pop(0))
            return (tensors, metadata) if has_metadata else tensors
        answer = call()
        tensors, metadata = answer if has_metadata else (answer, {})
        self.executor._answers.append(wire.encode(tensors, metadata=metadata))
        return answer

    def forward(self, step: int, tensors: Any) -> Any:
        return self._answer(lambda: self.transport.forward(step, tensors), True)

    def backward(self, step: int, grads: Any) -> Any:
        return self._answer(lambda: self.transport.backward(step, grads), False)

    def train(self, step: int, tensors: Any) -> Any:
        return self._answer(lambda: self.transport.train(step, tensors), True)

    def predict(self, tensors: Any) -> Any:
        return self.transport.predict(tensors)  # changes nothing: never logged


class ChainExecutor:
    """The `StepExecutor` of a server (`server_app.step_machine`): runs `runner` (this
    server's segment) and, when `served.next` is set, the rest of the chain on the server at
    `next_url`, through one `StepLoop` (a chain of one when this server is alone).

    Args:
        runner: the `SegmentRunner` of this server's segment.
        served: what this server serves (`Topology.served(segment)`).
        label_specs: the model outputs, when the chain ends with the labels.
        next_url, next_key: the next server of the chain and its key.
        wire_dtype: the wire dtype between the servers.
        transport_factory: makes the transport to the next server (tests: in-process apps).
    """

    def __init__(self, runner: Any, served: Served, *, label_specs: Sequence[TensorSpec] = (),
                 next_url: str | None = None, next_key: str | None = None,
                 wire_dtype: str = "float32",
                 transport_factory: Callable[[], Transport] | None = None) -> None:
        self.served = served
        self.input_names = [s.name for s in served.inputs]
        self.output_names = [s.name for s in served.outputs]
        self.label_specs = list(label_specs)
        self.wire_dtype = wire_dtype
        if served.next is not None and next_url is None and transport_factory is None:
            raise ValueError(f"Segment '{served.segment}' is followed by '{served.next}' on another "
                             "server: give its URL (--next URL).")
        self._make_transport = transport_factory or (lambda: _transport(str(next_url), next_key))
        self.local: Any = _LabelRunner(runner) if runner.holds_labels else runner
        self._alone = StepLoop([self.local]) if served.next is None else None
        self._loops: dict[str, StepLoop] = {}
        self._transports: dict[str, Transport] = {}
        self._restored: dict[str, dict[str, Any]] = {}
        self._answers: list[bytes] = []  # the next server's answers of the change in progress
        self._feed: list[bytes] | None = None  # while replaying: the logged answers

    # ---- the loops: one for a lone server, one per device session in a chain ---------------------
    def _loop(self, session_id: str) -> StepLoop:
        if self._alone is not None:
            return self._alone
        loop = self._loops.get(session_id)
        if loop is None:
            import json

            from splitkeras.client.remote import RemoteSegment
            from splitkeras.segments import Segment

            transport = self._make_transport()
            saved = self._restored.pop(session_id, None)
            if saved is None and self._feed and self._feed[0].startswith(_SESSION):
                saved = json.loads(self._feed.pop(0)[len(_SESSION):])  # opened after the checkpoint
            if saved is not None:  # carry on in the session the checkpoint (or log) names
                transport.session, transport._offset = saved["session"], saved["offset"]
                transport.wire_dtype = saved.get("wire_dtype", self.wire_dtype)
            else:
                transport.open_session(self.wire_dtype)
                self._answers.append(_SESSION + json.dumps(
                    {"session": transport.session, "offset": None, "wire_dtype": self.wire_dtype}).encode())
            self._transports[session_id] = transport
            following = Segment(str(self.served.next), "server", None, list(self.served.next_inputs),
                                list(self.served.next_outputs))
            remote = RemoteSegment(following, _Recorder(transport, self),  # type: ignore[arg-type]
                                   self.label_specs if self.served.holds_labels else None)
            loop = self._loops[session_id] = StepLoop([self.local, _NextServer(remote)])
        return loop

    # ---- the StepExecutor interface -------------------------------------------------------------
    def forward(self, key: tuple[str, int], inputs: list[Any]) -> tuple[list[Any], float]:
        self._answers = []  # this change's next-server answers only
        loop = self._loop(key[0])
        store = loop.forward(key, dict(zip(self.input_names, inputs)))
        try:
            return [store[name] for name in self.output_names], float(loop.regularization(key))
        except BaseException:
            loop.drop(key)
            raise

    def backward(self, key: tuple[str, int], output_grads: list[Any]) -> list[Any | None]:
        self._answers = []  # this change's next-server answers only
        grads = self._loop(key[0]).backward(key, dict(zip(self.output_names, output_grads)))
        return [grads.get(name) for name in self.input_names]

    def train(self, key: tuple[str, int], inputs: list[Any], y: Any,
              sample_weight: Any) -> tuple[list[Any | None], dict[str, Any]]:
        self._answers = []  # this change's next-server answers only
        grads, logs = self._loop(key[0]).train(key, dict(zip(self.input_names, inputs)), y,
                                               sample_weight)
        return [grads.get(name) for name in self.input_names], logs

    # ---- micro-batched groups (server_app.group_steps): this segment only, no chain ---------------
    def forward_union(self, key: tuple[str, int], inputs: list[Any]) -> tuple[list[Any], float]:
        """The training-mode forward of a group's union batch; kept under `key` until
        `backward_union(key, ...)` or `drop(key)`."""
        if self._alone is None or not hasattr(self.local, "forward"):
            raise ValueError("Micro-batching runs on a lone server with a U-shaped split (no --next).")
        outputs = self.local.forward(key, inputs)
        return list(outputs), float(self.local.pending_regularization(key))

    def backward_union(self, key: tuple[str, int], output_grads: list[Any],
                       gradient_scale: float) -> list[Any | None]:
        """ONE vector-Jacobian product of the union forward and ONE update, its weight
        gradients times `gradient_scale`; the input gradients of the union, unscaled."""
        try:
            return list(self.local.backward(key, output_grads, gradient_scale=gradient_scale))
        finally:
            self.local.drop(key)

    def predict(self, inputs: list[Any]) -> list[Any]:
        """Inference through the chain (a chain's predictions go through one shared downstream
        session: predict changes nothing, so sessions need not be told apart)."""
        store, _ = self._loop("predict").infer(dict(zip(self.input_names, inputs)))
        return [store[name] for name in self.output_names]

    def drop(self, key: tuple[str, int]) -> None:
        loop = self._alone or self._loops.get(key[0])
        if loop is not None:
            loop.drop(key)
        else:
            self.local.drop(key)

    def has_pending(self, key: tuple[str, int]) -> bool:
        """Whether `key`'s forward is held, waiting for its backward."""
        loop = self._alone or self._loops.get(key[0])
        return loop is not None and loop.has_pending(key)

    # ---- the write-ahead log ----------------------------------------------------------------------
    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Run a forward again to rebuild its tape without its side effects: the model's
        variables (BatchNorm moving statistics, seed generator states) are put back after it;
        a checkpoint already holds them, and the guard's running scales, which counted it once."""
        runner = self.local.runner if isinstance(self.local, _LabelRunner) else self.local
        variables = list(runner.model.variables)
        saved = [v.numpy().copy() for v in variables]
        guard = getattr(runner, "guard", None)
        scales = guard.state() if guard is not None else None
        try:
            yield
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)
            if guard is not None and scales is not None:
                guard.restore(scales)


    def take_answers(self) -> list[bytes]:
        """The next server's answers (and a newly opened downstream session) of the change just
        made, for its log record."""
        answers, self._answers = self._answers, []
        return answers

    def feed_answers(self, blobs: list[bytes] | None) -> None:
        """While replaying one logged change: its next-server answers (None: live again)."""
        self._feed = None if blobs is None else list(blobs)
        self._answers = []

    # ---- downstream sessions --------------------------------------------------------------------
    def close_session(self, session_id: str, notify: bool = True) -> None:
        """The device closed its session: close the next server's session too (best effort).
        `notify=False` (an idle session closed by this server) only lets go of it: the next
        server closes it by its own idle timeout, and no request waits on a slow next server."""
        self._loops.pop(session_id, None)
        self._restored.pop(session_id, None)
        transport = self._transports.pop(session_id, None)
        if transport is not None:
            if notify:
                transport.close()
            else:
                transport.close_connection()

    def persisted(self) -> dict[str, dict[str, Any]]:
        """The next server's session of each device session, for this server's checkpoint."""
        saved = dict(self._restored)
        for session_id, transport in self._transports.items():
            if transport.session is not None:
                saved[session_id] = {"session": transport.session, "offset": transport._offset,
                                     "wire_dtype": transport.wire_dtype}
        return saved

    def restore(self, saved: dict[str, dict[str, Any]]) -> None:
        """After a restart: each device session continues in its saved downstream session."""
        self._restored = dict(saved)

    def close(self) -> None:
        """At shutdown: close the connections, keep the downstream sessions (a restart resumes
        them from the checkpoint)."""
        for transport in self._transports.values():
            transport.close_connection()
        self._transports.clear()
        self._loops.clear()


def _transport(url: str, key: str | None) -> Transport:
    from splitkeras.client.transport import Transport

    # A next server that restarts (a redeploy, a crash) is waited for as a device waits for
    # this one: the transport's default retry budget, 64 to 107 s.
    return Transport(url, key=key)
