"""Schedules: cron expressions that submit a task at each firing.

Expressions are parsed and stepped by croniter, in the daemon's local time. Daemons sharing a queue
fire each firing once between them. A firing whose
schedule still has a task queued, blocked or running is skipped (with a log line). After the
daemon was down, a schedule that missed firings fires once at start, not once per missed slot.
The scheduler sleeps until the next firing, woken early when schedules change.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self

from croniter import croniter

from corral.errors import BadRequest, CorralError
from corral.models import Schedule, Task, TaskState
from corral.storage.base import Store

log = logging.getLogger(__name__)

_MAX_SLEEP_S = 3600.0
_BUSY = (TaskState.QUEUED, TaskState.BLOCKED, TaskState.RUNNING)


# The pool's submit: a prompt and the task's options.
Submit = Callable[..., Awaitable[Task]]


def check_cron(expression: str) -> str:
    """The expression, if croniter reads it; a 400 that quotes it if not."""
    if not croniter.is_valid(expression):
        raise BadRequest(f"{expression!r} is not a cron expression (five fields: minute hour"
                         " day-of-month month day-of-week)", code="bad_cron")
    return expression


def next_firing(expression: str, after: float) -> float:
    """The first firing strictly after ``after`` (a timestamp), in local time."""
    start = dt.datetime.fromtimestamp(after).astimezone()
    return float(croniter(expression, start).get_next(dt.datetime).timestamp())


class Scheduler:
    """Fires the store's schedules through ``submit``; ``async with`` runs it."""

    def __init__(self, store: Store, submit: Submit, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.submit = submit
        self.clock = clock
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._loop = asyncio.create_task(self._run(), name="corral-scheduler")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None

    def wake(self) -> None:
        """Look again now: a schedule was added or removed, or the clock moved."""
        self._wake.set()

    async def add(self, cron: str, prompt: str, options: Mapping[str, Any]) -> Schedule:
        """A schedule; one with a working dir fires its tasks for this node (the dir is this
        host's) unless its options name another node or any."""
        options = dict(options)
        if options.get("workdir") and not options.get("node"):
            options["node"] = self.store.node_id
        schedule = await self.store.add_schedule(check_cron(cron), prompt, options,
                                                 self.clock())
        self.wake()
        return self.described(schedule)

    async def list(self) -> list[Schedule]:
        return [self.described(s) for s in await self.store.schedules()]

    async def remove(self, schedule_id: int) -> None:
        await self.store.remove_schedule(schedule_id)
        self.wake()

    def described(self, schedule: Schedule) -> Schedule:
        schedule.next_at = next_firing(schedule.cron, max(self._since(schedule), self.clock()))
        return schedule

    @staticmethod
    def _since(schedule: Schedule) -> float:
        return schedule.last_fired_at or schedule.created_at

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self._fire_due()
            except Exception:  # a database hiccup must not end the schedules for good
                log.exception("scheduler failed; trying again in a minute")
                delay = 60.0
            with contextlib.suppress(TimeoutError):  # the next firing is due
                await asyncio.wait_for(self._wake.wait(), timeout=min(delay, _MAX_SLEEP_S))

    async def _fire_due(self) -> float:
        """Fire what is due (each schedule once, however many slots it missed); returns how
        long until the next firing."""
        now = self.clock()
        soonest = _MAX_SLEEP_S
        for schedule in await self.store.schedules():
            due = next_firing(schedule.cron, self._since(schedule))
            if due <= now:
                await self._fire(schedule, now)
                due = next_firing(schedule.cron, now)
            soonest = min(soonest, max(due - now, 0.0))
        return soonest

    async def _fire(self, schedule: Schedule, now: float) -> None:
        # Every daemon on a shared queue runs a scheduler: the first to take the firing
        # fires it, the others find it taken.
        if not await self.store.take_firing(schedule.id, schedule.last_fired_at, now):
            return
        if schedule.last_task_id is not None:
            try:
                last = await self.store.get_task(schedule.last_task_id)
            except CorralError:
                last = None
            if last is not None and last.state in _BUSY:
                log.info("schedule %s skipped a firing: its task %s is still %s", schedule.id,
                         last.id, last.state)
                await self.store.schedule_fired(schedule.id, now, None)
                return
        try:
            task = await self.submit(schedule.prompt, schedule_id=schedule.id,
                                     **schedule.options)
        except CorralError as exc:
            log.warning("schedule %s could not submit its task: %s", schedule.id, exc.message)
            await self.store.schedule_fired(schedule.id, now, None)
            return
        log.info("schedule %s fired: task %s", schedule.id, task.id)
        await self.store.schedule_fired(schedule.id, now, task.id)
