"""Retention: finished tasks past ``[daemon] keep_days`` go, with their executions and logs.

The store deletes the rows in short transactions (a submit or a claim never waits behind a
whole prune); the execution folders are removed afterwards, off the event loop, and only
folders directly inside the daemon's own executions folder: a path recorded in the database
that points anywhere else is left alone. What was spent stays in the daily usage counters, so
budgets and ``stats --by day`` keep their history. A task whose worktree is still on disk is
kept until the workspace cleanup has removed it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import BadRequest
from corral.storage.base import Store

log = logging.getLogger(__name__)

DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class PruneReport:
    older_than_days: float
    dry_run: bool
    tasks: int
    executions: int
    log_dirs_removed: int

    def to_dict(self) -> dict[str, object]:
        return {"older_than_days": self.older_than_days, "dry_run": self.dry_run,
                "tasks": self.tasks, "executions": self.executions,
                "log_dirs_removed": self.log_dirs_removed}


class Retention:
    """Prunes ``store`` of finished tasks older than ``keep_days`` (0: keep everything)."""

    def __init__(self, store: Store, executions_dir: Path, keep_days: float, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.executions_dir = executions_dir
        self.keep_days = keep_days
        self.clock = clock

    async def prune(self, older_than_days: float | None = None, *,
                    dry_run: bool = False) -> PruneReport:
        """Prune by hand (``older_than_days``) or by the configured ``keep_days``."""
        days = self.keep_days if older_than_days is None else older_than_days
        if days <= 0:
            raise BadRequest("say how old: --older-than DAYS, or set [daemon] keep_days",
                             code="no_retention")
        pruned = await self.store.prune(self.clock() - days * DAY_S, dry_run=dry_run)
        removed = await asyncio.to_thread(self._remove, pruned.log_dirs)
        if pruned.tasks and not dry_run:
            log.info("pruned %d tasks and %d executions finished over %g days ago",
                     pruned.tasks, pruned.executions, days)
        return PruneReport(days, dry_run, pruned.tasks, pruned.executions, removed)

    async def keep(self) -> None:
        """The periodic job: prune by ``keep_days`` when it is set."""
        if self.keep_days > 0:
            await self.prune()

    def _remove(self, log_dirs: list[str]) -> int:
        ours = self.executions_dir.resolve()
        removed = 0
        for raw in log_dirs:
            folder = Path(raw).resolve()
            if folder.parent != ours:
                log.warning("not removing %s: it is not an execution folder of this daemon", raw)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        return removed
