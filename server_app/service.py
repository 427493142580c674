"""The server segment as a service: sessions, the step state machine, one writer.

This module knows nothing of HTTP: it takes and returns bytes (safetensors bodies)
and raises `RequestRefused` for refusals. All TensorFlow work and every state change
run on ONE worker thread, in arrival order, so updates from many devices are applied
one at a time and a refused request changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from server_app import keys
from server_app.segment_host import SegmentHost
from server_app.sessions import InMemorySessionStore, Session, SessionStore
from server_app.settings import ServerSettings
from server_app.train_body import TrainBody
from splitkeras import wire
from splitkeras.errors import RequestRefused
from splitkeras.tensor_spec import TensorSpec

__all__ = ["SegmentService", "Session"]

T = TypeVar("T")
log = logging.getLogger("splitkeras.server")


class SegmentService:
    """Loads the server segment of a split and runs the protocol of `docs/protocol.md`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.host = host = SegmentHost(settings)
        self.entry, self.mode, self.segment, self.runner = host.entry, host.mode, host.segment, host.runner
        self.manifest = host.manifest
        loss = host.loss
        self.output_specs = self.entry.outputs
        self.train_body = TrainBody(self.entry.inputs, self.manifest.model_outputs, loss,
                                    settings.max_batch)
        self.label_specs = self.train_body.label_specs
        max_batch = settings.max_batch
        inputs_limit = wire.max_body_bytes(self.entry.inputs, max_batch)
        self.body_limits = {
            "forward": inputs_limit,
            "predict": inputs_limit,
            "backward": wire.max_body_bytes(self.output_specs, max_batch),
            # labels may be int64 class ids or float targets: budget 8 bytes per element
            "train": inputs_limit + 2 * wire.max_body_bytes(self.label_specs, max_batch),
        }
        self.sessions: SessionStore = InMemorySessionStore()
        self.applied_steps = 0
        self.server_key = keys.ServerKey(settings.key or keys.load_or_create_key(settings.key_file))
        self.checkpoint_dir = host.checkpoint_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitkeras-writer")
        self._since_checkpoint = 0
        self._built = False
        self.resumed_from: int | None = None
        self._resume()

    # ---- checkpoint, segment file --------------------------------------------------------------
    def _resume(self) -> None:
        state = self.host.load_checkpoint()
        if state is None:
            return
        self.applied_steps = int(state.get("applied_steps", 0))
        self.resumed_from = self.applied_steps
        for data in state.get("sessions", []):
            session = Session(**data)
            if session.pending_step is not None:  # its tape did not survive the restart
                session.lost_step, session.pending_step = session.pending_step, None
                session.next_step = session.lost_step
            self.sessions.add(session)

    def save_checkpoint(self) -> None:
        """Write variables, optimizer state and sessions atomically (worker thread only)."""
        self.host.save_checkpoint(self.applied_steps, [s.persisted() for s in self.sessions])
        self._since_checkpoint = 0

    def save_segment(self) -> None:
        self.host.save_segment()

    def checkpoint_dir_writable(self) -> bool:
        return self.host.checkpoint_dir_writable()

    # ---- running on the single writer --------------------------------------------------------
    async def run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        self._executor.submit(self._shutdown).result()
        self._executor.shutdown(wait=True)

    def _shutdown(self) -> None:
        try:
            self.save_checkpoint()
        except OSError as error:  # still write the .keras below; /readyz already said 503
            log.error("Could not write the checkpoint at shutdown: %s", error)
        self.save_segment()

    # ---- sessions ----------------------------------------------------------------------------
    def check_key(self, key: str | None) -> None:
        self.server_key.check(key)

    def session(self, session_id: str, token: str | None) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise RequestRefused("unknown_session",
                                 f"No session '{session_id}' (closed, or never opened). Open a new "
                                 "one with POST /v1/sessions.")
        keys.check_token(token, session.token_hash)
        return session

    def open_session(self, wire_dtype: str) -> tuple[Session, str]:
        if wire_dtype not in wire.WIRE_DTYPES:
            raise RequestRefused("bad_request",
                                 f"wire_dtype must be one of {list(wire.WIRE_DTYPES)}, got '{wire_dtype}'.")
        if len(self.sessions) >= self.settings.max_sessions:
            raise RequestRefused("too_many_sessions",
                                 f"The server holds {len(self.sessions)} sessions, its limit. Close "
                                 "unused sessions (DELETE /v1/sessions/{id}).")
        token = keys.new_token()
        session = Session(session_id=secrets.token_hex(8), token_hash=keys.hash_token(token),
                          wire_dtype=wire_dtype)
        self.sessions.add(session)
        return session, token

    def close_session(self, session: Session) -> None:
        if session.pending_step is not None:
            self.runner.drop((session.session_id, session.pending_step))
        self.sessions.remove(session.session_id)

    def describe(self) -> dict[str, Any]:
        return {"segment": self.entry.name, "mode": self.mode, "max_batch": self.settings.max_batch,
                "inputs": [s.to_json() for s in self.entry.inputs],
                "outputs": [s.to_json() for s in self.entry.outputs]}

    def sweep_expired(self) -> int:
        """Drop pending steps older than the TTL (worker thread). Returns how many."""
        now = time.monotonic()
        dropped = 0
        for session in self.sessions:
            if session.pending_step is not None and \
                    now - session.pending_since > self.settings.step_ttl_seconds:
                self.runner.drop((session.session_id, session.pending_step))
                session.expired_step = session.pending_step
                session.next_step = session.pending_step
                session.pending_step = None
                dropped += 1
        return dropped

    # ---- the step state machine (worker thread) ----------------------------------------------
    def _decode(self, body: bytes, specs: list[TensorSpec]) -> list[np.ndarray]:
        tensors, _ = wire.decode(body, specs, max_batch=self.settings.max_batch)
        return [tensors[s.name] for s in specs]

    def _out_of_order(self, session: Session, step: int, route: str) -> RequestRefused:
        if route == "backward" and step == session.lost_step:
            return RequestRefused("forward_lost",
                                  f"The forward pass of step {step} was lost when the server restarted. "
                                  f"Send forward for step {step} again with the same activations, then "
                                  "backward.", expected_step=step)
        if route == "backward" and step == session.expired_step:
            return RequestRefused("step_expired",
                                  f"Step {step} waited longer than {self.settings.step_ttl_seconds:g} s "
                                  f"for its backward and was dropped. Send forward for step {step} again.",
                                  expected_step=step)
        if session.pending_step is not None:
            return RequestRefused("step_out_of_order",
                                  f"Step {session.pending_step} is waiting for its backward; got "
                                  f"{route} for step {step}.", expected_step=session.pending_step)
        return RequestRefused("step_out_of_order",
                              f"Expected {route if route != 'backward' else 'forward'} for step "
                              f"{session.next_step} or later, got {route} for step {step}.",
                              expected_step=session.next_step)

    def _require_mode(self, route: str) -> None:
        wanted = "labels_on_server" if route == "train" else "u_shaped"
        if self.mode != wanted:
            other = "train" if self.mode == "labels_on_server" else "forward/backward"
            raise RequestRefused("wrong_mode",
                                 f"This split's server segment runs in mode '{self.mode}': use {other}, "
                                 f"not {route}.")

    def _require_open(self, session: Session) -> None:
        # the session object was looked up before this job reached the writer: it may be closed now
        if self.sessions.get(session.session_id) is not session:
            raise RequestRefused("unknown_session",
                                 f"Session '{session.session_id}' was closed. Open a new one with "
                                 "POST /v1/sessions.")

    def forward(self, session: Session, step: int, body: bytes) -> bytes:
        self._require_mode("forward")
        self._require_open(session)
        inputs = self._decode(body, self.entry.inputs)  # a retry's body is checked too
        if session.last_forward and session.last_forward[0] == step and \
                (session.pending_step == step or session.next_step > step):
            return session.last_forward[1]  # a retry: same bytes, nothing runs
        if session.pending_step is not None or step < session.next_step:
            raise self._out_of_order(session, step, "forward")
        key = (session.session_id, step)
        outputs = self.runner.forward(key, inputs)
        try:
            regularization = float(self.runner.pending_regularization(key))
            response = wire.encode({s.name: t for s, t in zip(self.output_specs, outputs)},
                                   wire_dtype=session.wire_dtype,
                                   metadata={"step": str(step), "regularization_loss": repr(regularization)})
        except BaseException:
            self.runner.drop(key)  # e.g. an output beyond float16's range: no step is left pending
            raise
        session.pending_step, session.pending_since = step, time.monotonic()
        session.pending_batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else None
        session.lost_step = session.expired_step = None
        session.last_forward = (step, response)
        return response

    def backward(self, session: Session, step: int, body: bytes) -> bytes:
        self._require_mode("backward")
        self._require_open(session)
        grads = self._decode(body, self.output_specs)
        if session.pending_step != step:
            if session.last_backward and session.last_backward[0] == step:
                return session.last_backward[1]
            raise self._out_of_order(session, step, "backward")
        batch = int(grads[0].shape[0]) if grads and grads[0].ndim else None
        if session.pending_batch is not None and batch != session.pending_batch:
            raise RequestRefused("bad_tensor",
                                 f"The gradients have batch size {batch}, but the forward pass of step "
                                 f"{step} had {session.pending_batch}: send one gradient per output "
                                 "sample, shaped like the forward response.")
        input_grads = self.runner.backward((session.session_id, step), grads)
        response = wire.encode(
            {s.name: g for s, g in zip(self.entry.inputs, input_grads) if g is not None},
            wire_dtype=session.wire_dtype, metadata={"step": str(step)})
        session.last_backward = (step, response)  # before the checkpoint: a retry must find it
        self._finish_step(session, step)
        return response

    def train(self, session: Session, step: int, body: bytes) -> bytes:
        self._require_mode("train")
        self._require_open(session)
        tensors, _ = wire.decode(body, None, max_batch=self.settings.max_batch)
        inputs, y, sample_weight = self.train_body.parse(tensors)
        if session.last_backward and session.last_backward[0] == step and session.next_step > step:
            return session.last_backward[1]
        if step < session.next_step:
            raise self._out_of_order(session, step, "train")
        if not self._built:
            self._build_label_model(y)
        # The metadata reports THIS step's loss and metrics (the device averages them per epoch, as
        # model.fit does), not running means over every device's steps since the server started.
        self.runner.model.reset_metrics()
        input_grads, logs = self.runner.train_step((session.session_id, step), inputs, y, sample_weight)
        metadata = {"step": str(step)}
        metadata.update({k: repr(float(v)) for k, v in logs.items()})
        response = wire.encode(
            {s.name: g for s, g in zip(self.entry.inputs, input_grads) if g is not None},
            wire_dtype=session.wire_dtype, metadata=metadata)
        session.last_backward = (step, response)  # before the checkpoint: a retry must find it
        self._finish_step(session, step)
        return response

    def _build_label_model(self, y: Any) -> None:
        import tensorflow as tf

        x = [np.zeros((1, *(d or 1 for d in s.sample_shape)), dtype=s.dtype) for s in self.entry.inputs]
        y1 = tf.nest.map_structure(lambda t: t[:1], y)
        self.runner.model._symbolic_build(data_batch=(x[0] if len(x) == 1 else x, y1, None))
        self._built = True

    def _finish_step(self, session: Session, step: int) -> None:
        session.pending_step = None
        session.next_step = step + 1
        session.applied_steps += 1
        self.applied_steps += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.settings.checkpoint_every:
            try:
                self.save_checkpoint()
            except OSError as error:  # the step is applied: answer it; retry at the next step
                log.error("Could not write the checkpoint to '%s': %s", self.checkpoint_dir, error)

    def predict(self, session: Session, body: bytes) -> bytes:
        self._require_open(session)
        inputs = self._decode(body, self.entry.inputs)
        outputs = self.runner.predict(inputs)
        return wire.encode({s.name: t for s, t in zip(self.output_specs, outputs)},
                           wire_dtype=session.wire_dtype)
