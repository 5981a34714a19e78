"""Reviewing and landing a task's work: diff, merge, discard, the list of workspaces, cleanup.

Thin on purpose: the git work is :class:`corral.workspace.manager.Workspaces`; this module
checks that the task is in a state where the action makes sense, and records the workspace's
new state in the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from corral.errors import Conflict
from corral.models import Task, Workspace
from corral.storage.base import Store
from corral.workspace.manager import Workspaces

log = logging.getLogger(__name__)

LIVE_STATES = ("planned", "active", "removed")


class Landing:
    """What the API's diff, merge, discard and workspaces routes do."""

    def __init__(self, store: Store, workspaces: Workspaces, *, keep_days: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.workspaces = workspaces
        self.keep_days = keep_days
        self.clock = clock

    async def _workspace(self, task_id: int, action: str, *, idle: bool) -> tuple[Task, Workspace]:
        task = await self.store.get_task(task_id)
        ws = task.workspace
        if ws is None:
            raise Conflict(f"task {task_id} runs in place ({task.workdir or 'no working dir'}):"
                           f" it has no branch to {action}")
        if ws.state in ("merged", "discarded"):
            raise Conflict(f"task {task_id}'s branch was already {ws.state}")
        if task.node is not None and task.node != self.store.node_id:
            raise Conflict(f"task {task_id}'s worktree is on node {task.node}: {action} it"
                           " there (corral --socket … on that host)", code="other_node")
        if idle and not task.state.final:
            raise Conflict(f"task {task_id} is {task.state}; {action} it once it has finished"
                           " (or cancel it first)")
        return task, ws

    async def diff(self, task_id: int, *, stat: bool) -> str:
        _, ws = await self._workspace(task_id, "diff", idle=False)
        return await self.workspaces.diff(ws, stat=stat)

    async def merge(self, task_id: int, *, squash: bool) -> dict[str, Any]:
        task, ws = await self._workspace(task_id, "merge", idle=True)
        commit = await self.workspaces.merge(ws, squash=squash)
        await self.store.set_workspace(task.id, ws.replace(state="merged"))
        return {"task_id": task.id, "merged": commit, "branch": ws.branch, "squash": squash,
                "branch_deleted": self.workspaces.delete_merged}

    async def discard(self, task_id: int) -> dict[str, Any]:
        task, ws = await self._workspace(task_id, "discard", idle=True)
        await self.workspaces.discard(ws)
        await self.store.set_workspace(task.id, ws.replace(state="discarded"))
        return {"task_id": task.id, "discarded": ws.branch}

    async def list(self) -> list[dict[str, Any]]:
        out = []
        for task in await self.store.workspaces(LIVE_STATES):
            assert task.workspace is not None
            status = await self.workspaces.status(task.workspace)
            out.append({"task_id": task.id, "task_state": str(task.state),
                        **task.workspace.to_dict(), **status})
        return out

    async def cleanup(self) -> int:
        """Prune every repository's worktree list; remove worktrees of tasks finished more
        than ``keep_days`` ago (their branches stay). Returns how many went."""
        tasks = await self.store.workspaces(LIVE_STATES)
        await self.workspaces.prune(t.workspace.repo for t in tasks if t.workspace)
        removed = 0
        cutoff = self.clock() - self.keep_days * 86400
        for task in tasks:
            ws = task.workspace
            if (ws is None or ws.state != "active" or not task.state.final
                    or task.updated_at > cutoff):
                continue
            await self.workspaces.remove_worktree(ws)
            await self.store.set_workspace(task.id, ws.replace(state="removed"))
            removed += 1
        if removed:
            log.info("removed %d idle worktrees (branches kept)", removed)
        return removed
