"""Word when a task ends: a webhook POST of the task, and a command of the user's.

The pool hands every task id that reaches a final state to :meth:`Notifier.task_finished`, which
only queues it. Deliveries run in the background, a few at once: a webhook is retried with
backoff, a command runs without a shell with the task's one-line summary as its last argument,
both bounded in time. A receiver that is down, slow or broken costs a log line, never a task,
a worker slot or the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import aiohttp

from corral.config import NotifySettings
from corral.executor.proc import kill_group
from corral.models import Task
from corral.retry import backoff_delay
from corral.storage.base import Store

log = logging.getLogger(__name__)

DELIVERIES_AT_ONCE = 4
_QUEUE_LIMIT = 10_000


def payload(task: Task) -> dict[str, Any]:
    """What a webhook receives: the task, with its spend and its last execution's outcome."""
    last = task.executions[-1] if task.executions else None
    costs = [e.cost_usd for e in task.executions if e.cost_usd is not None]
    return {
        "event": "task.finished", "id": task.id, "state": str(task.state),
        "agent": task.agent, "model": task.model, "prompt": task.prompt, "error": task.error,
        "cost_usd": round(sum(costs), 6) if costs else None,
        "cost_estimated": any(e.cost_estimated for e in task.executions),
        "tokens_in": sum(e.tokens_in or 0 for e in task.executions),
        "tokens_out": sum(e.tokens_out or 0 for e in task.executions),
        "summary": last.summary if last else None,
        "files_changed": last.files_changed if last else None,
        "insertions": last.insertions if last else None,
        "deletions": last.deletions if last else None,
        "workspace": task.workspace.to_dict() if task.workspace else None,
        "executions": len(task.executions),
    }


def one_line(task: Task) -> str:
    last = task.executions[-1] if task.executions else None
    said = (last.summary if last else None) or task.error or task.prompt
    return " ".join(f"task {task.id} {task.state}: {said}".split())[:300]


class Notifier:
    """``async with Notifier(store, settings)``; a no-op when nothing is configured."""

    def __init__(self, store: Store, settings: NotifySettings, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.settings = settings
        self.sleep = sleep
        self._queue: asyncio.Queue[int] = asyncio.Queue(_QUEUE_LIMIT)
        self._worker: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(DELIVERIES_AT_ONCE)
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.webhook_url or self.settings.command)

    async def __aenter__(self) -> Self:
        if self.enabled:
            self._session = aiohttp.ClientSession()
            self._worker = asyncio.create_task(self._run(), name="corral-notify")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop at once: what is still being delivered is given up (with a log line)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
        pending = list(self._deliveries)
        for delivery in pending:
            delivery.cancel()
        await asyncio.gather(*pending, *(w for w in (worker,) if w), return_exceptions=True)
        if pending or not self._queue.empty():
            log.warning("shutdown gave up %d notifications", len(pending) + self._queue.qsize())
        if self._session is not None:
            await self._session.close()
            self._session = None

    def task_finished(self, task_id: int) -> None:
        """Queue word of a task's end; returns at once, whatever the receivers do."""
        if not self.enabled or self._worker is None:
            return
        try:
            self._queue.put_nowait(task_id)
        except asyncio.QueueFull:
            log.warning("notification queue full; task %s ends unannounced", task_id)

    async def _run(self) -> None:
        while True:
            task_id = await self._queue.get()
            await self._slots.acquire()
            delivery = asyncio.create_task(self._deliver(task_id), name=f"corral-notify-{task_id}")
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._done)

    def _done(self, delivery: asyncio.Task[None]) -> None:
        self._deliveries.discard(delivery)
        self._slots.release()

    async def _deliver(self, task_id: int) -> None:
        try:
            task = await self.store.get_task(task_id, with_executions=True)
        except Exception as exc:
            log.warning("notification for task %s: cannot read it: %s", task_id, exc)
            return
        jobs = []
        if self.settings.webhook_url:
            jobs.append(self._webhook(task))
        if self.settings.command:
            jobs.append(self._command(task))
        await asyncio.gather(*jobs)

    async def _webhook(self, task: Task) -> None:
        assert self._session is not None
        body = payload(task)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds)
        attempts = self.settings.webhook_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with self._session.post(self.settings.webhook_url, json=body,
                                              timeout=timeout) as resp:
                    if resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
            if attempt < attempts:
                await self.sleep(backoff_delay(attempt, base_s=1.0, cap_s=30.0))
        log.warning("webhook for task %s failed after %d attempts: %s", task.id, attempts,
                    problem)

    async def _command(self, task: Task) -> None:
        argv = [*self.settings.command, one_line(task)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("notify command %s cannot start: %s", argv[0], exc)
            return
        try:
            async with asyncio.timeout(self.settings.command_timeout_seconds):
                code = await proc.wait()
            if code:
                log.warning("notify command %s exited with %s for task %s", argv[0], code,
                            task.id)
        except TimeoutError:
            log.warning("notify command %s ran past %gs for task %s; killed", argv[0],
                        self.settings.command_timeout_seconds, task.id)
        finally:
            if proc.returncode is None:
                kill_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()
