"""Connections to PostgreSQL through asyncpg: a pool, transactions that outlive a restart of
the server, and a listening connection that wakes the daemon when work arrives.

A lost connection (the server restarting, a network blip) is not a failure of the write: the
transaction is run again on a new connection with backoff, for up to ``reconnect_s``, so an
agent's result waits in memory until the server is back. Only errors of the connection's own
classes are retried (SQLSTATE class 08, operator intervention 57, a socket error); anything
else is the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from corral.config import redact_url
from corral.errors import StoreUnavailable
from corral.retry import backoff_delay
from corral.storage.migrate import migrate_postgres

log = logging.getLogger(__name__)

T = TypeVar("T")
# What a transaction function is handed: a pooled connection.
if TYPE_CHECKING:  # generic only in the stubs
    Conn = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
else:
    Conn = asyncpg.pool.PoolConnectionProxy
Tx = Callable[[Conn], Awaitable[T]]

# What a server going away looks like from here; these are retried, nothing else.
LOST = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
        asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InterfaceError)
TASK_CHANNEL = "corral_task"  # a task was stored or changed state ("id state")
LOG_CHANNEL = "corral_log"  # an execution's log grew or it ended (its id)
CANCEL_CHANNEL = "corral_cancel"  # cancel this task, whoever runs it (its id)


def local_zone() -> str:
    """This host's time zone name, so "a day" of spend is the daemon's local day."""
    if os.environ.get("TZ"):
        return os.environ["TZ"].lstrip(":")
    with contextlib.suppress(OSError):
        target = str(Path("/etc/localtime").resolve())
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    return "UTC"


class Postgres:
    """A pool of connections to one database; ``open`` migrates it, ``close`` is safe twice."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 10,
        connect_timeout_s: float = 10.0,
        reconnect_s: float = 300.0,
        migrate_upto: int | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self._max = max_connections
        self._connect_timeout_s = connect_timeout_s
        self.reconnect_s = reconnect_s
        self._migrate_upto = migrate_upto
        self._sleep = sleep
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # listeners replaced, still closing
        self._heard: dict[str, list[Callable[[str], None]]] = {}
        self._cutoff: float | None = None  # no write waits for the server past this

    def _settings(self) -> dict[str, str]:
        return {"application_name": "corral", "TimeZone": local_zone()}

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            first = await asyncpg.connect(self.url, timeout=self._connect_timeout_s,
                                          server_settings=self._settings())
        except (*LOST, asyncpg.PostgresError, ValueError) as exc:
            raise StoreUnavailable(
                f"cannot connect to {redact_url(self.url)}: {_reason(exc)}") from None
        try:
            await migrate_postgres(first, upto=self._migrate_upto)
        finally:
            await first.close()
        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=self._max, timeout=self._connect_timeout_s,
            server_settings=self._settings(), reset=_keep)

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        listeners = {*self._stopping, *([listener] if listener is not None else [])}
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def run(self, fn: Tx[T], *, transaction: bool = True,
                  within_s: float | None = None) -> T:
        """``fn`` on a pooled connection (in a transaction), again on a new one if the
        connection is lost, for up to ``within_s`` (default ``reconnect_s``)."""
        deadline = time.monotonic() + (self.reconnect_s if within_s is None else within_s)
        attempt = 0
        while True:
            if self._cutoff is not None:
                deadline = min(deadline, self._cutoff)
            if self._pool is None:
                raise StoreUnavailable("the database is not open")
            closed = True  # whether the connection in use was gone when it failed
            try:
                async with self._pool.acquire() as conn:
                    try:
                        if not transaction:
                            return await fn(conn)
                        async with conn.transaction():
                            return await fn(conn)
                    except asyncpg.exceptions.InterfaceError:
                        closed = conn.is_closed()  # asked while it is still ours
                        raise
            except LOST as exc:
                # An interface error on a connection still open is a misuse, not a loss.
                if isinstance(exc, asyncpg.exceptions.InterfaceError) and not closed:
                    raise
                attempt += 1
                delay = backoff_delay(attempt, base_s=0.1, cap_s=5.0)
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"lost the database at {redact_url(self.url)}: {_reason(exc)}") from exc
                if attempt == 1:
                    log.warning("lost the database (%s); retrying", _reason(exc))
                await self._sleep(delay)

    def give_up_after(self, seconds: float) -> None:
        """Writes in flight and to come wait at most ``seconds`` more for a lost server."""
        self._cutoff = time.monotonic() + seconds

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.run(lambda c: c.fetch(sql, *args), transaction=False)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.run(lambda c: c.fetchrow(sql, *args), transaction=False)

    async def execute(self, sql: str, *args: Any, within_s: float | None = None) -> int:
        """One statement (atomic by itself: no BEGIN and COMMIT round trips); how many rows
        it changed."""
        status = await self.run(lambda c: c.execute(sql, *args), transaction=False,
                                within_s=within_s)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdecimal() else 0

    def listen(self, channel: str, heard: Callable[[str], None]) -> None:
        """Call ``heard(payload)`` for each notification on ``channel``, and once with ``""``
        whenever the listening connection is made (what was missed while it was not)."""
        new = channel not in self._heard
        self._heard.setdefault(channel, []).append(heard)
        if new and self._listener is not None:
            self._stopping.add(self._listener)  # listening again, with this channel too
            self._listener.add_done_callback(self._stopping.discard)
            self._listener.cancel()
        if new or self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="corral-pg-listen")

    def _notified(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        for heard in self._heard.get(channel, ()):
            heard(str(payload))

    async def _listen(self) -> None:
        """One connection LISTENing, made again whenever it is lost (a missed notification
        is covered by the call after reconnecting, and by the pool's safety poll)."""
        attempt = 0
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.url, timeout=self._connect_timeout_s,
                                             server_settings=self._settings())
            except (*LOST, asyncpg.PostgresError) as exc:
                attempt += 1
                log.debug("listening connection failed: %s", _reason(exc))
                await self._sleep(backoff_delay(attempt, base_s=0.2, cap_s=5.0))
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in list(self._heard):
                    await conn.add_listener(channel, self._notified)
                attempt = 0
                for channel in list(self._heard):
                    self._notified(conn, 0, channel, "")
                await lost.wait()
            except LOST:
                pass
            finally:
                with contextlib.suppress(*LOST):
                    await conn.close(timeout=1.0)


async def _keep(_conn: object) -> None:
    """A pooled connection goes back as it is. asyncpg's default reset sends four statements
    (unlock all, close all, unlisten, reset all) on every release, more than the one a task's
    write needs; these connections take no session locks, listen to nothing and change no
    settings (the listener and the migration have connections of their own)."""


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
