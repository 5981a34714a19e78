"""An execution's ``stdout.log`` copied into a shared store as it is written, so ``corral logs
[-f]`` works on every node of the queue, live.

The file stays the record and the fast path on the node that runs the execution; the copy
follows it in chunks of at most ``CHUNK_BYTES``, at most one write per ``min_interval_s``
however chatty the agent is. The shipper holds no output in memory (it reads what the file
gained since its last chunk), so a store that is away only delays the copy: what it could not
ship, it ships on the next turn, and ``close`` ships the rest before the execution is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

# 256 KiB: a long line of tool output fits in one, and a follower's read stays small.
CHUNK_BYTES = 256 * 1024
MIN_INTERVAL_S = 0.25

Append = Callable[[int, int, bytes], Awaitable[None]]  # (execution id, seq, data)


def _read(path: Path, offset: int, limit: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(limit)
    except FileNotFoundError:
        return b""


class LogShipper:
    """One execution's copier: ``poke`` when the log grew, ``close`` once the run ended."""

    def __init__(self, execution_id: int, path: Path, append: Append, *,
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.execution_id = execution_id
        self.path = path
        self._append = append
        self._min_interval_s = min_interval_s
        self._offset = 0
        self._seq = 0
        self._pending: bytes | None = None
        self._grew = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._grew.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"corral-ship-{self.execution_id}")

    async def close(self) -> None:
        """Ship what is left; a store that cannot take it now is logged, not raised."""
        self._closed.set()
        self._grew.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"corral-ship-{self.execution_id}")
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        while True:
            # At most one turn per interval, the first one too: a run that ends within it
            # (most tasks of bench.dispatch --store) is shipped once, by close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._min_interval_s):
                    await self._closed.wait()
            await self._grew.wait()
            self._grew.clear()
            await self._ship_all()
            if self._closed.is_set():
                return

    async def _ship_all(self) -> None:
        try:
            while True:
                # A chunk whose write failed is sent again as it was: the same seq must never
                # name two different chunks.
                if self._pending is None:
                    self._pending = await asyncio.to_thread(_read, self.path, self._offset,
                                                            CHUNK_BYTES)
                if not self._pending:
                    self._pending = None
                    return
                await self._append(self.execution_id, self._seq, self._pending)
                self._offset += len(self._pending)
                self._seq += 1
                self._pending = None
        except Exception as exc:  # the store is away: the file keeps it, the next turn ships it
            log.warning("copying the log of execution %s to the store failed: %s",
                        self.execution_id, exc)
