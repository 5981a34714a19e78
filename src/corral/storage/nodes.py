"""The daemons sharing one PostgreSQL queue: registration, heartbeats, and the dead.

Each daemon is a node with an id of its own. It registers at start (refused while another
daemon with that id has a fresh heartbeat), writes a heartbeat every ``heartbeat_s``, and on
each beat looks for nodes whose heartbeat is older than ``node_timeout_s``: exactly one
survivor (the node's row is locked, ``SKIP LOCKED``) marks their running executions
``interrupted`` and requeues their tasks, counting the attempt, as a restart does on one host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from corral.errors import NodeTaken
from corral.host import procs
from corral.models import ProcessIdentity, TaskState
from corral.storage import pg_dependencies as dependencies
from corral.storage.pgconn import Conn, Postgres

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    host: str
    pid: int
    proc_started: int | None
    boot_id: str | None

    @classmethod
    def this_process(cls, node_id: str) -> NodeInfo:
        me = procs.identify(os.getpid())
        return cls(node_id, socket.gethostname(), os.getpid(), me.started, me.boot_id)


async def interrupt(c: Conn, node_id: str, now: float, why: str, *,
                    keep: list[int] | None = None, started_before: float | None = None) -> int:
    """Inside a transaction: the node's running executions (but those in ``keep``, and only
    those started before ``started_before``) become ``interrupted``; their tasks are queued
    again, or fail when out of attempts. Returns how many were interrupted."""
    task_ids = [r[0] for r in await c.fetch(
        "UPDATE executions SET status = 'interrupted', finished_at = $1, error = $2"
        " WHERE status = 'running' AND node_id = $3 AND NOT id = ANY($4::bigint[])"
        " AND started_at < $5 RETURNING task_id", now, why, node_id, keep or [],
        now + 1 if started_before is None else started_before)]
    if not task_ids:
        return 0
    spent = [r[0] for r in await c.fetch(
        "UPDATE tasks SET state = 'failed', updated_at = $1, error = $2"
        " WHERE id = ANY($3::bigint[]) AND state = 'running' AND attempts > max_retries"
        " RETURNING id", now, f"{why}, and out of attempts", task_ids)]
    for task_id in spent:
        await dependencies.settle_dependents(c, task_id, TaskState.FAILED, now)
    await c.execute("UPDATE tasks SET state = 'queued', updated_at = $1"
                    " WHERE id = ANY($2::bigint[]) AND state = 'running'", now, task_ids)
    return len(task_ids)


class Nodes:
    """This daemon's node: registered on ``start``, beating until ``stop`` (safe twice)."""

    def __init__(
        self,
        db: Postgres,
        me: NodeInfo,
        *,
        heartbeat_s: float,
        node_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.db = db
        self.me = me
        self.heartbeat_s = heartbeat_s
        self.node_timeout_s = node_timeout_s
        self._clock = clock
        self._beating: asyncio.Task[None] | None = None
        # Since when this node's own heartbeats have gone through without a gap: a node just
        # back from losing the server would otherwise take everyone else for dead.
        self._steady_since: float | None = None
        self.reaped = 0  # executions this node took back from dead ones

    async def start(self) -> None:
        await self.db.run(self._register)
        self._steady_since = self._clock()
        self._beating = asyncio.create_task(self._beat(), name="corral-heartbeat")

    async def stop(self) -> None:
        """Stop beating and leave the table: a clean stop has handed its tasks back already."""
        beating, self._beating = self._beating, None
        if beating is None:
            return
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        try:
            # Briefly: a server that is away must not hold up the stop (the row goes stale).
            await self.db.execute("DELETE FROM nodes WHERE node_id = $1 AND pid = $2",
                                  self.me.node_id, self.me.pid, within_s=2.0)
        except Exception as exc:  # the server is gone: the row goes stale, which is the same
            log.warning("could not remove node %s from the queue: %s", self.me.node_id, exc)

    async def _register(self, c: Conn) -> None:
        now = self._clock()
        row = await c.fetchrow("SELECT host, pid, proc_started, boot_id, heartbeat_at FROM nodes"
                               " WHERE node_id = $1 FOR UPDATE", self.me.node_id)
        if row is not None and now - row["heartbeat_at"] < self.node_timeout_s \
                and not self._provably_gone(row):
            raise NodeTaken(
                f"node {self.me.node_id!r} is already running on {row['host']} (pid"
                f" {row['pid']}, heartbeat {now - row['heartbeat_at']:.0f} s ago); give this"
                " daemon another [daemon] node_id")
        await c.execute(
            "INSERT INTO nodes (node_id, host, pid, proc_started, boot_id, started_at,"
            " heartbeat_at) VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (node_id) DO UPDATE"
            " SET host = $2, pid = $3, proc_started = $4, boot_id = $5, started_at = $6,"
            " heartbeat_at = $6", self.me.node_id, self.me.host, self.me.pid,
            self.me.proc_started, self.me.boot_id, now)

    def _provably_gone(self, row: asyncpg.Record) -> bool:
        """A fresh heartbeat from a process of this host that no longer exists (killed a
        moment ago, or this very process); elsewhere only the heartbeat can tell."""
        if row["host"] != self.me.host:
            return False
        if row["pid"] == self.me.pid and row["proc_started"] == self.me.proc_started:
            return True
        return not procs.is_alive_and_same(ProcessIdentity(
            pgid=row["pid"], started=row["proc_started"], boot_id=row["boot_id"]))

    async def beat(self) -> int:
        """One heartbeat, then the dead nodes' executions taken back; returns how many."""
        now = self._clock()
        if not await self.db.execute("UPDATE nodes SET heartbeat_at = $1 WHERE node_id = $2",
                                     now, self.me.node_id, within_s=0):
            # Out of touch long enough to be taken for dead: its tasks went to others, and
            # what it finishes now is not recorded over theirs (finish checks the execution).
            log.error("node %s was presumed dead by the others; registering again",
                      self.me.node_id)
            await self.db.run(self._register)
            self._steady_since = now
        if self._steady_since is None or now - self._steady_since < self.node_timeout_s:
            return 0
        return await self.db.run(lambda c: self._reap(c, now), within_s=0)

    async def _reap(self, c: Conn, now: float) -> int:
        dead = await c.fetch(
            "SELECT node_id, heartbeat_at FROM nodes WHERE heartbeat_at < $1 AND node_id <> $2"
            " FOR UPDATE SKIP LOCKED", now - self.node_timeout_s, self.me.node_id)
        count = 0
        for node in dead:
            n = await interrupt(c, node["node_id"], now,
                                f"node {node['node_id']} stopped answering")
            await c.execute("DELETE FROM nodes WHERE node_id = $1", node["node_id"])
            log.warning("node %s has no heartbeat for %.0f s: %d of its executions"
                        " interrupted, their tasks requeued", node["node_id"],
                        now - node["heartbeat_at"], n)
            count += n
        return count

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                self.reaped += await self.beat()
            except Exception as exc:  # a lost server or anything else: the next beat tries again
                if self._steady_since is not None:  # once per outage, not once per beat
                    log.warning("heartbeat failed: %s", exc)
                self._steady_since = None
            else:
                if self._steady_since is None:
                    log.warning("heartbeat restored")
                    self._steady_since = self._clock()
