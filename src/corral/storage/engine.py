"""SQLite connections off the event loop: one writer thread with group commit, a few readers.

The standard library's ``sqlite3`` only, through public calls. The writer connection lives on
a thread of its own, so a whole transaction runs there in one hop and no other coroutine's
statement can land in the middle of it. In WAL mode readers never wait for the writer and
never hold it up: they run on a small pool of threads, each read on a connection of its own
(``query_only``), so a heavy listing cannot stall a submit, a claim or a finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from corral.storage.migrate import migrate_sqlite

T = TypeVar("T")
Fn = Callable[[sqlite3.Connection], T]


@contextlib.contextmanager
def transaction(c: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection; rolled back on error."""
    c.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")


def _run_all(fns: list[Fn[Any]], c: sqlite3.Connection) -> list[Any]:
    with transaction(c):
        return [fn(c) for fn in fns]


class GroupCommit:
    """Writes that arrive while a commit is in flight share the next transaction.

    Each caller hears back only after the COMMIT, so what it was told is durable. A burst of
    submissions or of finished attempts then costs one thread hop and one commit, not one each.
    If a shared transaction fails, its writes are retried one by one, so one bad write cannot
    sink the others.
    """

    def __init__(self, run: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]):
        self._run = run
        self._pending: list[tuple[Fn[Any], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def write(self, fn: Fn[T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="corral-group-commit")
        return await future

    async def idle(self) -> None:
        """Until every write handed in so far is committed (or has failed)."""
        if self._drainer is not None:
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            fns = [fn for fn, _ in batch]
            futures = [future for _, future in batch]
            try:
                await self._run(partial(_commit_and_tell, loop, fns, futures))
            except Exception:
                _settle(futures, [await self._alone(fn) for fn in fns])

    async def _alone(self, fn: Fn[Any]) -> tuple[bool, Any]:
        try:
            return True, (await self._run(partial(_run_all, [fn])))[0]
        except Exception as exc:
            return False, exc


def _commit_and_tell(
    loop: asyncio.AbstractEventLoop,
    fns: list[Fn[Any]],
    futures: list[asyncio.Future[Any]],
    c: sqlite3.Connection,
) -> None:
    """On the writer thread: one transaction, then its callers told straight away."""
    results = _run_all(fns, c)
    # A closed loop cannot be told; raising here would make the committed writes run a
    # second time through the one-by-one retry.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, futures, [(True, r) for r in results])


def _settle(futures: list[asyncio.Future[Any]], results: list[tuple[bool, Any]]) -> None:
    for future, (ok, value) in zip(futures, results, strict=True):
        if future.done():  # the caller stopped waiting; the write happened anyway
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Database:
    """The connections to one SQLite file; ``open`` migrates it, ``close`` is safe twice."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        readers: int = 2,
        migrate_upto: int | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._trace = trace  # sees every statement run (tests check each one's query plan)
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._reader_count = max(readers, 1)
        self._migrate_upto = migrate_upto
        self._writer: ThreadPoolExecutor | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_conns: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self.group = GroupCommit(self.write_now)

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        # check_same_thread off: a reader connection serves whichever reader thread takes
        # it, one read at a time; the writer's only ever runs on the writer thread.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            if self._trace is not None:
                conn.set_trace_callback(self._trace)
            if read_only:
                conn.execute("PRAGMA query_only=1")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self._synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
                migrate_sqlite(conn, upto=self._migrate_upto)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._writer is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="corral-db-writer")
        try:
            self._writer_conn = await loop.run_in_executor(
                self._writer, partial(self._connect, read_only=False))
            self._readers = ThreadPoolExecutor(self._reader_count,
                                               thread_name_prefix="corral-db-reader")
            for _ in range(self._reader_count):
                self._reader_conns.put(await loop.run_in_executor(
                    self._readers, partial(self._connect, read_only=True)))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.group.idle()  # what callers were promised is committed first
        writer, self._writer = self._writer, None
        readers, self._readers = self._readers, None
        conn, self._writer_conn = self._writer_conn, None
        if writer is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(writer, conn.close)
            writer.shutdown(wait=True)
        if readers is not None:
            readers.shutdown(wait=True)
        while not self._reader_conns.empty():
            self._reader_conns.get_nowait().close()

    async def write_now(self, fn: Fn[T]) -> T:
        """Run ``fn`` with the writer connection on its thread (``fn`` opens any transaction)."""
        if self._writer is None or self._writer_conn is None:
            raise RuntimeError("the database is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, fn, self._writer_conn)

    async def read(self, fn: Fn[T]) -> T:
        """Run ``fn`` with a reader connection on a reader thread."""
        if self._readers is None:
            raise RuntimeError("the database is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, self._with_reader, fn)

    def _with_reader(self, fn: Fn[T]) -> T:
        conn = self._reader_conns.get()
        try:
            return fn(conn)
        finally:
            self._reader_conns.put(conn)

    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return await self.read(lambda c: c.execute(sql, params).fetchone())

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return await self.read(lambda c: c.execute(sql, params).fetchall())

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """One write statement through group commit; the number of rows it changed."""
        return await self.group.write(lambda c: int(c.execute(sql, params).rowcount))
