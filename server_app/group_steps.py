"""Micro-batched steps on the writer thread: several sessions' forwards run as ONE
training-mode forward of their union batch, and their backwards as ONE vector-Jacobian
product and ONE update (docs/protocol.md, "Micro-batching").

A group's members are (session, step) pairs, their rows concatenated in arrival order.
Each member is checked, answered, cached and counted by the `StepMachine`'s own phases
(`forward_check` / `forward_answer` / `forward_finish`, the same for backward), so
exactly-once retries and refusals are the sequential server's. What differs:

* the forward's BatchNormalization statistics (and any batch-dependent layer) are those of
  the union; each member gets its rows of the outputs, and the union's regularization loss;
* the backward's seeds are the members' output gradients concatenated, unscaled, so each
  member's input gradients are d(its own loss)/d(its activations) through the union
  forward; the weight gradient is divided by the number of members whose gradients count
  (`gradient_scale=1/K`): the update is the MEAN over the group's K device steps;
* a member that does not send its backward within the wait (`micro_batch.Batcher`), or
  whose backward is refused (a bad tensor, a guard), counts as zero (its rows' seeds are
  zeros, it is not in K) and its step expires (`step_expired`: it may send its forward
  again, into a later group). Any failure of the union backward expires every member.

This module knows no HTTP; the async gathering is `server_app.micro_batch`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server_app.sessions import Session
from server_app.step_machine import StepKey, StepMachine
from server_app.wal import Record
from splitkeras.errors import RequestRefused

__all__ = ["Group", "GroupSteps"]

Answer = bytes | BaseException


@dataclass
class Group:
    """One union forward waiting for its members' backwards."""

    group_id: int
    members: list[StepKey]  # in union order
    rows: list[int]  # each member's batch size
    output_shapes: list[list[tuple[int, ...]]]  # per member, per output
    output_dtypes: list[Any]
    bodies: list[bytes]  # the members' forward bodies (a checkpoint logs them again)
    codecs: list[str]
    answered: set[StepKey] = field(default_factory=set)  # members whose forward was answered

    @property
    def key(self) -> tuple[str, int]:
        return ("group", self.group_id)


class GroupSteps:
    """The groups of `machine`'s sessions, run on `executor` (a lone server's `ChainExecutor`).

    Args:
        machine: the step machine (its phases, log and counters).
        executor: runs the union forward and backward (`forward_union`, `backward_union`).
        guard: the `UpdateGuard`, which checks each member's tensors before the union runs.
        on_refused: called with (session, step, error) for each member refused.
    """

    def __init__(self, machine: StepMachine, executor: Any, guard: Any = None,
                 on_refused: Callable[[Session, int, BaseException], None] = lambda *_: None) -> None:
        self.machine, self.executor, self.guard, self.on_refused = machine, executor, guard, on_refused
        self.groups: dict[int, Group] = {}
        self.member_group: dict[StepKey, int] = {}
        self._ids = itertools.count()
        self.applied_groups = 0

    def group_of(self, session_id: str, step: int) -> int | None:
        """The group whose backward `(session_id, step)` belongs to (None: not in one)."""
        return self.member_group.get((session_id, step))

    def expected(self, group_id: int) -> int:
        """How many members of the group can still send their backward."""
        group = self.groups.get(group_id)
        if group is None:
            return 1
        return sum(1 for member in group.members if self._pending(member) is not None) or 1

    def _pending(self, member: StepKey) -> Session | None:
        session = self.machine.store.get(member[0])
        return session if session is not None and session.pending_step == member[1] else None

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, items: list[tuple[Session, int, bytes]], group_id: int | None = None) -> list[Answer]:
        """One union forward of `items` (session, step, body); one answer per item (bytes, or
        the refusal to raise for it), in order."""
        machine = self.machine
        answers: list[Answer | None] = [None] * len(items)
        members: list[tuple[int, Session, int, list[np.ndarray], bytes]] = []
        for index, (session, step, body) in enumerate(items):
            try:
                inputs, cached = machine.forward_check(session, step, body)
                if cached is not None:
                    answers[index] = cached
                    continue
                earlier = [s for _, other, s, _, _ in members if other is session]
                if earlier:
                    raise RequestRefused("step_out_of_order",
                                         f"Step {earlier[0]} is waiting for its backward; got forward for "
                                         f"step {step}.", expected_step=earlier[0])
                self._check(session, step, "input", self.executor.input_names, inputs)
                members.append((index, session, step, inputs, body))
            except BaseException as error:
                answers[index] = error
                self.on_refused(session, step, error)
        if members:
            self._run_forward(members, answers, group_id)
        return [a if a is not None else RuntimeError("no answer") for a in answers]

    def _check(self, session: Session, step: int, role: str, names: list[str], values: list[Any]) -> None:
        """The guard's checks of one member's tensors (its running scales learn from them)."""
        if self.guard is not None:
            self.guard.accept(self.guard.measure_all(role, names, values))

    def _run_forward(self, members: list[tuple[int, Session, int, list[np.ndarray], bytes]],
                     answers: list[Answer | None], group_id: int | None) -> None:
        machine = self.machine
        group_id = next(self._ids) if group_id is None else group_id
        self._ids = itertools.count(max(group_id + 1, next(self._ids)))
        key = ("group", group_id)
        union = [np.concatenate([m[3][i] for m in members]) for i in range(len(members[0][3]))]
        try:
            outputs, regularization = self.executor.forward_union(key, union)
        except BaseException as error:
            for index, session, step, _, _ in members:
                answers[index] = error
                self.on_refused(session, step, error)
            return
        outputs = [np.asarray(o) for o in outputs]
        rows = [int(m[3][0].shape[0]) for m in members]
        offsets = np.cumsum([0, *rows])
        group = Group(group_id, [(s.session_id, step) for _, s, step, _, _ in members], rows,
                      [[o[offsets[j]:offsets[j + 1]].shape for o in outputs] for j in range(len(members))],
                      [o.dtype for o in outputs], [m[4] for m in members],
                      [s.codec("forward") for _, s, _, _, _ in members])
        responses: dict[int, bytes] = {}
        for j, (index, session, step, _, _) in enumerate(members):
            try:
                responses[j] = machine.forward_answer(
                    session, step, [o[offsets[j]:offsets[j + 1]] for o in outputs], regularization)
            except BaseException as error:  # e.g. beyond float16's range: this member only
                answers[index] = error
        if not responses:
            self.executor.drop(key)
            return
        try:
            self._log(Record("group_forward", {"group": group_id, "members": [list(m) for m in group.members]},
                             list(group.bodies)))
        except BaseException as error:  # not durable: nothing acknowledged, nothing pending
            self.executor.drop(key)
            for index, *_ in members:
                answers[index] = error
            return
        self._keep(group, [(members[j][1], members[j][2], members[j][3], responses[j]) for j in responses])
        for j, response in responses.items():
            answers[members[j][0]] = response

    def _keep(self, group: Group, answered: list[tuple[Session, int, list[np.ndarray], bytes | None]]) -> None:
        self.groups[group.group_id] = group
        for session, step, inputs, response in answered:
            if response is not None:
                self.machine.forward_finish(session, step, inputs, response, None)
            group.answered.add((session.session_id, step))
            self.member_group[(session.session_id, step)] = group.group_id

    def _log(self, record: Record) -> None:
        if self.machine.journal is not None and not self.machine.replaying:
            self.machine.journal(record)

    # ---- backward ---------------------------------------------------------------------------
    def backward(self, group_id: int, items: list[tuple[Session, int, bytes]]) -> list[Answer]:
        """The group's ONE backward and update from the backwards that came (`items`); the
        members that did not come expire. One answer per item, in order."""
        machine = self.machine
        group = self.groups.get(group_id)
        answers: list[Answer | None] = [None] * len(items)
        counted: dict[StepKey, tuple[int, Session, list[np.ndarray], bytes]] = {}
        for index, (session, step, body) in enumerate(items):
            member = (session.session_id, step)
            try:
                grads, cached = machine.backward_check(session, step, body)
                if cached is not None:
                    answers[index] = cached
                    continue
                if group is None or member not in group.answered or member in counted:
                    raise RequestRefused("step_expired", f"Step {step} is not waiting in a micro-batch group. "
                                         f"Send forward for step {step} again.", expected_step=step)
                self._check(session, step, "output_grad", self.executor.output_names, grads)
                counted[member] = (index, session, grads, body)
            except BaseException as error:
                answers[index] = error
                self.on_refused(session, step, error)
                if group is not None and member in group.answered and session.pending_step == step:
                    machine.expire(session)  # its share counts as zero; it may resend its forward
        if group is None:
            return [a if a is not None else RuntimeError("no answer") for a in answers]
        for member in group.members:  # the members that did not come in time
            pending = self._pending(member)
            if member not in counted and pending is not None:
                machine.expire(pending)
        self._unlist(group)  # first: a checkpoint the update triggers must not log it as open
        try:
            if counted:
                self._run_backward(group, counted, answers)
        finally:
            self.executor.drop(group.key)
        return [a if a is not None else RuntimeError("no answer") for a in answers]

    def _run_backward(self, group: Group, counted: dict[StepKey, tuple[int, Session, list[np.ndarray], bytes]],
                      answers: list[Answer | None]) -> None:
        machine = self.machine
        seeds = []
        for i, dtype in enumerate(group.output_dtypes):
            parts = [np.asarray(counted[m][2][i], dtype) if m in counted else np.zeros(group.output_shapes[j][i], dtype)
                     for j, m in enumerate(group.members)]
            seeds.append(np.concatenate(parts))
        try:
            input_grads = self.executor.backward_union(group.key, seeds, 1.0 / len(counted))
        except BaseException as error:  # the union's update refused or failed: every member expires
            for index, session, _, _ in counted.values():
                answers[index] = error
                self.on_refused(session, session.pending_step or 0, error)
                machine.expire(session)
            return
        offsets = np.cumsum([0, *group.rows])
        responses: list[tuple[int, Session, int, bytes]] = []
        for j, member in enumerate(group.members):
            if member in counted:
                index, session, _, _ = counted[member]
                mine = [None if g is None else np.asarray(g)[offsets[j]:offsets[j + 1]] for g in input_grads]
                responses.append((index, session, member[1], machine.backward_answer(session, member[1], mine)))
        record = Record("group_backward", {"group": group.group_id,
                                           "members": [[s.session_id, step] for _, s, step, _ in responses]},
                        [counted[(s.session_id, step)][3] for _, s, step, _ in responses])
        try:
            self._log(record)
        except BaseException as error:  # applied in memory, answers cached; not acknowledged
            for index, session, step, response in responses:
                machine.applied(session, step, response, count_update=False, checkpoint=False)
                answers[index] = error
            machine.updates += 1
            return
        for index, session, step, response in responses:
            machine.applied(session, step, response, count_update=False, checkpoint=False)
            answers[index] = response
        machine.updates += 1
        self.applied_groups += 1
        if not machine.replaying:
            machine.on_applied()

    def _forget(self, group: Group) -> None:
        self.executor.drop(group.key)
        self._unlist(group)

    def _unlist(self, group: Group) -> None:
        self.groups.pop(group.group_id, None)
        for member in group.members:
            if self.member_group.get(member) == group.group_id:
                del self.member_group[member]

    # ---- sweeps, checkpoints, the log -------------------------------------------------------
    def sweep(self) -> int:
        """Forget the groups none of whose members can still send a backward."""
        gone = [g for g in self.groups.values() if not any(self._pending(m) is not None for m in g.members)]
        for group in gone:
            self._forget(group)
        return len(gone)

    def pending_records(self) -> list[Record]:
        """For a checkpoint: each open group's union forward (its tape is not in the checkpoint)."""
        return [Record("group_pending", {"group": g.group_id, "members": [list(m) for m in g.members],
                                         "codecs": g.codecs,
                                         "pending": [self._pending(m) is not None for m in g.members]},
                       list(g.bodies)) for g in self.groups.values()
                if any(self._pending(m) is not None for m in g.members)]

    def replay(self, record: Record) -> None:
        """Redo a logged group change (at start, after the checkpoint)."""
        machine = self.machine
        machine.replaying = True
        try:
            members = [(str(sid), int(step)) for sid, step in record.fields["members"]]
            group_id = int(record.fields["group"])
            if record.kind == "group_forward":
                items = [(s, step, body) for (sid, step), body in zip(members, record.blobs)
                         if (s := machine.store.get(sid)) is not None]
                self.forward(items, group_id)
            elif record.kind == "group_backward":
                items = [(s, step, body) for (sid, step), body in zip(members, record.blobs)
                         if (s := machine.store.get(sid)) is not None]
                self.backward(group_id, items)
            elif record.kind == "group_pending":
                self._rebuild(group_id, members, record)
        finally:
            machine.replaying = False

    def _rebuild(self, group_id: int, members: list[StepKey], record: Record) -> None:
        """A group pending at the checkpoint: its union forward again, without its side effects
        (the checkpoint holds them); its members that were pending are pending again."""
        inputs = [self.machine.bodies.inputs(body, codec) for body, codec in zip(record.blobs, record.fields["codecs"])]
        union = [np.concatenate([x[i] for x in inputs]) for i in range(len(inputs[0]))]
        key = ("group", group_id)
        with self.executor.isolated():
            outputs, regularization = self.executor.forward_union(key, union)
        outputs = [np.asarray(o) for o in outputs]
        rows = [int(x[0].shape[0]) for x in inputs]
        offsets = np.cumsum([0, *rows])
        group = Group(group_id, members, rows,
                      [[o[offsets[j]:offsets[j + 1]].shape for o in outputs] for j in range(len(members))],
                      [o.dtype for o in outputs], list(record.blobs), list(record.fields["codecs"]))
        self._ids = itertools.count(max(group_id + 1, next(self._ids)))
        again: list[tuple[Session, int, list[np.ndarray], bytes | None]] = []
        for j, (member, was_pending, x) in enumerate(zip(members, record.fields["pending"], inputs)):
            session = self.machine.store.get(member[0])
            if was_pending and session is not None and session.lost_step == member[1]:
                response = self.machine.forward_answer(
                    session, member[1], [o[offsets[j]:offsets[j + 1]] for o in outputs], regularization)
                again.append((session, member[1], x, response))
        self._keep(group, again)
