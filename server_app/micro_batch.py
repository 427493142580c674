"""Micro-batching across devices, the async half: requests gathered into batches on the
event loop, each batch handed to the single writer as ONE job (`server_app.group_steps`
runs it). Off unless `splitkeras serve --batch-window-ms N` (docs/protocol.md,
"Micro-batching").

`Batcher` is generic: a batch opens with its first submission and closes `wait` seconds
later, or as soon as `expected` submissions are in; `run(batch_key, items)` then answers
each item (a value, or an exception to raise for it). A submission whose item key is
already in the open batch (a retry while it gathers) waits for the same answer.

`MicroBatcher` uses two: the forwards gather in one batch at a time (the window,
`max_devices_per_batch` = K; it closes early once every open session without a pending step
has sent its forward: no one else can join), the backwards per group, until every member
that can still send one has (or `batch_backward_timeout_seconds` after the first one came).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server_app.service import SegmentService
    from server_app.sessions import Session

__all__ = ["Batcher", "MicroBatcher"]

_FORWARDS = "forwards"


@dataclass
class _Open:
    futures: dict[Hashable, asyncio.Future[Any]] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Gathers submissions into batches answered by `run` (see the module's docstring).

    Example:
        >>> async def run(key, items): return [item * 2 for item in items]  # doctest: +SKIP
        >>> await Batcher(run).submit("b", "x", 21, wait=0.01, expected=4)  # doctest: +SKIP
        42
    """

    def __init__(self, run: Callable[[Hashable, list[Any]], Awaitable[list[Any]]]) -> None:
        self.run = run
        self._open: dict[Hashable, _Open] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.batches: list[int] = []  # the size of each batch run (tests, benchmarks)

    async def submit(self, batch_key: Hashable, item_key: Hashable, item: Any, *, wait: float,
                     expected: int) -> Any:
        loop = asyncio.get_running_loop()
        batch = self._open.get(batch_key)
        if batch is None:
            batch = self._open[batch_key] = _Open()
            batch.timer = loop.call_later(wait, self._close, batch_key, batch)
        future = batch.futures.get(item_key)
        if future is None:
            future = batch.futures[item_key] = loop.create_future()
            batch.items.append(item)
            if len(batch.items) >= expected:
                self._close(batch_key, batch)
        return await asyncio.shield(future)

    def _close(self, batch_key: Hashable, batch: _Open) -> None:
        if self._open.get(batch_key) is not batch:
            return  # already closed (full before its timer fired)
        del self._open[batch_key]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._answer(batch_key, batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _answer(self, batch_key: Hashable, batch: _Open) -> None:
        self.batches.append(len(batch.items))
        try:
            answers = list(await self.run(batch_key, batch.items))
        except BaseException as error:  # the job itself failed: every member gets it
            answers = [error] * len(batch.items)
        for future, answer in zip(batch.futures.values(), answers):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


class MicroBatcher:
    """The forward and backward batchers of `service` (its settings: the window, K, the
    backward wait)."""

    def __init__(self, service: SegmentService) -> None:
        self.service = service
        settings = service.settings
        self.window = settings.batch_window_ms / 1000.0
        self.max_devices = settings.max_devices_per_batch
        self.backward_wait = settings.batch_backward_timeout_seconds
        self.forwards = Batcher(self._run_forwards)
        self.backwards = Batcher(self._run_backwards)

    @property
    def enabled(self) -> bool:
        return self.window > 0

    async def forward(self, session: Session, step: int, body: bytes) -> bytes:
        if not self.enabled:
            return await self.service.run(self.service.forward, session, step, body)
        answer: bytes = await self.forwards.submit(_FORWARDS, (session.session_id, step), (session, step, body),
                                                   wait=self.window, expected=self.expected_forwards())
        return answer

    def expected_forwards(self) -> int:
        """When the open forward batch is complete: K forwards, or every open session without
        a pending step (no other session can send a forward now: waiting longer gains nothing)."""
        idle = sum(1 for s in list(self.service.sessions) if s.pending_step is None)  # list(): one C call
        return max(1, min(self.max_devices, idle))

    async def backward(self, session: Session, step: int, body: bytes) -> bytes:
        groups = self.service.groups
        group_id = groups.group_of(session.session_id, step)
        if group_id is None:  # not in a group: a retry of an applied step, a refusal, or sequential
            return await self.service.run(self.service.backward, session, step, body)
        answer: bytes = await self.backwards.submit(group_id, (session.session_id, step), (session, step, body),
                                                    wait=self.backward_wait, expected=groups.expected(group_id))
        return answer

    async def _run_forwards(self, _: Hashable, items: list[Any]) -> list[Any]:
        return await self.service.run(self.service.forward_group, items)

    async def _run_backwards(self, group_id: Hashable, items: list[Any]) -> list[Any]:
        return await self.service.run(self.service.backward_group, group_id, items)
