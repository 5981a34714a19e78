"""Pool: claims tasks from the store, places them on agents, runs them, records every attempt.

* The store is the queue. A single dispatcher claims the best ready task with one atomic
  statement, but only for agents that have a free slot and are not cooling down, so a saturated
  agent never blocks another agent's tasks.
* Tasks that did not name a registered agent are classified as soon as they are submitted, by a
  classifier that talks to its LLM directly and holds no worker slot (no deadlock under load).
* A rate-limited agent cools down; its pinned tasks wait, unpinned tasks fail over elsewhere.
* A task's final state is written under ``asyncio.shield``: cancelling the daemon at that moment
  cannot lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from corral.config import PoolSettings, Price
from corral.errors import BadRequest, Conflict, NotFound, ShuttingDown
from corral.executor import logfiles
from corral.executor.budget import Budgets
from corral.executor.changes import git_base, measure_changes
from corral.executor.classifier import Classifier
from corral.executor.continuation import continuation
from corral.executor.logship import LogShipper
from corral.executor.runner import (
    STDOUT_LOG,
    Runner,
    RunRequest,
    RunResult,
    RunStatus,
    make_folders,
)
from corral.executor.streamjson import ChangeStat
from corral.executor.watch import Feed, Watchers
from corral.models import (
    AUTO,
    KNOWN_AGENTS,
    ExecStatus,
    Execution,
    FileChange,
    ProcessIdentity,
    Task,
    TaskState,
    Workspace,
)
from corral.retry import backoff_delay
from corral.storage.base import Finished, Store
from corral.workspace.manager import CommitStat, WorkspaceError, Workspaces, find_repository

log = logging.getLogger(__name__)

CLASSIFY_CONCURRENCY = 4
_MAX_IDLE_WAIT_S = 60.0


@dataclass(slots=True)
class AgentSlot:
    """One registered agent's live state: its limit, what runs on it, its cool-down."""

    name: str
    runner: Runner
    limit: int
    running: int = 0
    cooldown_until: float = 0.0
    cooldowns_in_a_row: int = 0
    last_error: str | None = None

    def free(self, now: float) -> int:
        if self.cooldown_until > now:
            return 0
        return max(self.limit - self.running, 0)


@dataclass(slots=True)
class _Job:
    task: Task
    slot: AgentSlot
    execution: Execution
    folder: Path
    worker: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    resumed_session: str | None = None
    shipper: LogShipper | None = None  # a shared store's copy of the log
    done: asyncio.Event = field(default_factory=asyncio.Event)


def balance(choice: str | None, free: Mapping[str, int]) -> str:
    """Load balancing: the agent with the most free slots; a tie goes to the classifier's choice.

    Pure: it runs inside the store's claiming transaction.
    """
    best = max(free.values())
    if choice is not None and free.get(choice) == best:
        return choice
    return min(name for name, n in free.items() if n == best)


class Pool:
    """The worker pool; ``async with Pool(...)`` starts dispatching, leaving it shuts down."""

    def __init__(
        self,
        store: Store,
        runners: Mapping[str, Runner],
        classifier: Classifier | None,
        settings: PoolSettings,
        executions_dir: Path,
        *,
        unavailable: Mapping[str, str] | None = None,
        grace_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        workspaces: Workspaces | None = None,
        isolate_default: bool = True,
        on_final: Callable[[int], None] | None = None,
        budgets: Budgets | None = None,
        prices: Mapping[str, Price] | None = None,
        known_agents: Sequence[str] = KNOWN_AGENTS,
    ) -> None:
        self.store = store
        self.known_agents = tuple(known_agents)  # built-in and configured, registered or not
        self.budgets = budgets
        self.prices = dict(prices or {})
        # Told each task id that reaches a final state (notifications); must not block.
        self.on_final = on_final
        self.workspaces = workspaces
        self.isolate_default = isolate_default
        self.settings = settings
        self.classifier = classifier
        self.executions_dir = executions_dir
        self.unavailable = dict(unavailable or {})
        self.grace_s = grace_s
        self.clock = clock
        self.agents = {
            name: AgentSlot(name, runner, settings.max_concurrent.for_agent(name))
            for name, runner in runners.items()
        }
        self._jobs: dict[int, _Job] = {}  # by task id
        self._running_executions: set[int] = set()
        self._wake = asyncio.Event()
        self._watchers = Watchers()
        self._classify_sem = asyncio.Semaphore(CLASSIFY_CONCURRENCY)
        self._classifying: set[asyncio.Task[None]] = set()
        self.task_changes = Feed()  # task ids, for the dashboard's live views
        self._compressing: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._accepting = False
        self._shutdown: asyncio.Task[None] | None = None

    # -- life cycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()

    async def start(self) -> None:
        await asyncio.to_thread(self.executions_dir.mkdir, parents=True, exist_ok=True)
        if self.budgets is not None:
            await self.budgets.refresh()
        self._accepting = True
        await self.store.unpin_unavailable(self.agents)
        for task in await self.store.unclassified():
            self._classify_later(task)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="corral-dispatcher")

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop taking work, let running tasks finish within the grace period, then cancel.

        Cancelled tasks go back to the queue. Safe to call more than once.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.create_task(
                self._do_shutdown(self.grace_s if grace_s is None else grace_s)
            )
        await asyncio.shield(self._shutdown)

    async def _do_shutdown(self, grace_s: float) -> None:
        self._accepting = False
        if self._dispatcher is not None:
            # The dispatcher stops by itself once a claim in flight is done: its tasks become
            # jobs, which the steps below hand back to the queue. Cancelled mid-claim, it
            # would leave them running with no worker until the next start.
            self.wake()
            _, pending = await asyncio.wait({self._dispatcher}, timeout=max(grace_s, 1.0))
            if pending:
                self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for task in list(self._classifying):
            task.cancel()
        await asyncio.gather(*self._classifying, return_exceptions=True)
        workers = [j.worker for j in self._jobs.values() if j.worker is not None]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=grace_s)
            for job in list(self._jobs.values()):
                if job.worker in pending:
                    job.cancel_reason = "shutdown"
                    job.worker.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # A compression cut short leaves the plain log, still readable: not worth waiting for.
        if self._compressing:
            await asyncio.wait(self._compressing, timeout=max(grace_s, 1.0))

    @property
    def accepting(self) -> bool:
        return self._accepting

    def wake(self) -> None:
        self._wake.set()

    # -- submitting, cancelling, waiting --------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        agent: str | None = None,
        model: str | None = None,
        workdir: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        timeout_s: float | None = None,
        isolate: bool | None = None,
        base_ref: str | None = None,
        after: Sequence[int] = (),
        max_cost_usd: float | None = None,
        schedule_id: int | None = None,
        node: str | None = None,
    ) -> Task:
        """Store a task. A registered agent pins it; anything else goes to the classifier.

        A task whose dir is in a git repository gets a workspace of its own (unless
        ``isolate`` is false), starting from the repository's HEAD now, or ``base_ref``.
        A task with a dir runs on this node (its paths are this host's) unless ``node`` names
        another or is ``any``; one without a dir runs anywhere unless ``node`` names one.
        """
        if not self._accepting:
            raise ShuttingDown("the daemon is shutting down and takes no new tasks")
        if agent is not None:
            self.check_agent(agent)
        isolate = self.isolate_default if isolate is None else isolate
        plan = await self._plan_workspace(prompt, workdir, isolate, base_ref, after)
        pinned = agent in self.agents
        task = await self.store.create_task(
            prompt, requested_agent=agent, requested_model=model,
            agent=agent if pinned else None, model=model, pinned=pinned,
            classifier_reason="requested by the submitter" if pinned else None,
            workdir=workdir, priority=priority,
            max_retries=self.settings.default_max_retries if max_retries is None else max_retries,
            timeout_s=timeout_s, isolate=isolate, base_ref=base_ref, workspace=plan,
            after=after, max_cost_usd=max_cost_usd, schedule_id=schedule_id,
            node=None if node == "any" else node or (self.store.node_id if workdir else None),
        )
        self._changed(task.id)
        if pinned:
            self.wake()
        else:
            self._classify_later(task)
        return task

    async def cancel(self, task_id: int) -> Task:
        if (done := await self.store.cancel_queued(task_id)) is not None:
            self._settle(task_id, done)
            return await self.store.get_task(task_id, with_executions=True)
        job = self._jobs.get(task_id)
        if job is None:
            task = await self.store.get_task(task_id, with_executions=True)
            if task.state == TaskState.RUNNING and self.store.shared and task.executions:
                return await self._cancel_elsewhere(task)
            raise Conflict(f"task {task_id} is already {task.state}; nothing to cancel")
        job.cancel_reason = "cancelled"
        if job.worker is not None:
            job.worker.cancel()
        await job.done.wait()
        return await self.store.get_task(task_id, with_executions=True)

    def cancel_requested(self, task_id: int) -> None:
        """Another node asked for this task to be cancelled: done if it runs here."""
        job = self._jobs.get(task_id)
        if job is not None and job.worker is not None:
            job.cancel_reason = "cancelled"
            job.worker.cancel()

    async def _cancel_elsewhere(self, task: Task) -> Task:
        """The task runs on another node of a shared queue: that node is asked, and this
        waits (for its grace period and a little) until it has recorded the end."""
        execution = task.executions[-1]
        with self.watch_execution(execution.id) as ended:
            await self.store.request_cancel(task.id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.grace_s + self.settings.kill_grace_seconds + 5):
                    while (await self.store.get_execution(execution.id)).status == "running":
                        ended.clear()
                        with contextlib.suppress(TimeoutError):  # a missed notification
                            async with asyncio.timeout(1.0):
                                await ended.wait()
        return await self.store.get_task(task.id, with_executions=True)

    def check_agent(self, agent: str) -> None:
        """A 400 for a name that is no agent corral knows."""
        if agent != AUTO and agent not in self.known_agents:
            raise BadRequest(
                f"unknown agent {agent!r}; known agents:"
                f" {', '.join((*self.known_agents, AUTO))}",
                code="unknown_agent",
            )

    async def _plan_workspace(
        self, prompt: str, workdir: str | None, isolate: bool, base_ref: str | None,
        after: Sequence[int] = (),
    ) -> Callable[[int], Workspace] | None:
        """How the new task's workspace is named from its id, or None: it runs in place."""
        if workdir is None or not isolate or self.workspaces is None:
            if base_ref is not None:
                raise BadRequest("--base needs a working dir in a git repository, isolated",
                                 code="bad_base")
            return None
        workspaces = self.workspaces
        try:
            repo = await find_repository(Path(workdir))
            if repo is None:
                if base_ref is not None:
                    raise BadRequest(f"--base given, but {workdir} is not in a git repository",
                                     code="bad_base")
                return None
            base = await workspaces.base_commit(repo, base_ref)
        except WorkspaceError as exc:
            raise BadRequest(exc.message, code="bad_workspace") from None
        branch = None if base_ref else await self._dependency_branch(after, str(repo.top))
        return lambda task_id: workspaces.plan(task_id, prompt, repo, base, base_branch=branch)

    async def _dependency_branch(self, after: Sequence[int], repo: str) -> str | None:
        """The branch of the last dependency in the same repository: plan, then implement,
        then review, each building on the one before."""
        for dep_id in reversed(after):
            try:
                dep = await self.store.get_task(dep_id)
            except NotFound:
                raise BadRequest(f"--after names task {dep_id}, which does not exist",
                                 code="unknown_dependency") from None
            if dep.workspace is not None and dep.workspace.repo == repo:
                return dep.workspace.branch
        return None

    async def reply(self, task_id: int, prompt: str) -> Task:
        """A follow-up in the same conversation, on the same agent and in the same workspace.

        A finished task runs again with it; a queued or running one takes it once the current
        prompt is done.
        """
        if not self._accepting:
            raise ShuttingDown("the daemon is shutting down and takes no new tasks")
        earlier = await self.store.executions_for(task_id)
        agent = earlier[-1].agent if earlier else None
        task = await self.store.add_reply(task_id, prompt,
                                          agent=agent if agent in self.agents else None)
        task.executions = earlier
        self._changed(task_id)
        if task.agent is None:
            self._classify_later(task)
        self.wake()
        return task

    async def retry(self, task_id: int) -> tuple[Task, list[int]]:
        """Queue a finished task again; returns it and the dependents its failure cancelled,
        which stay cancelled."""
        task, cancelled = await self.store.requeue(task_id)
        task.executions = await self.store.executions_for(task_id)
        self._changed(task_id)
        if task.agent is None:
            self._classify_later(task)
        self.wake()
        return task, cancelled

    async def wait_final(self, task_id: int, timeout_s: float) -> Task:
        """The task once it is final, or as it is when ``timeout_s`` runs out."""
        with self._watchers.watch(("task", task_id)) as changed:
            task = await self.store.get_task(task_id)
            try:
                async with asyncio.timeout(timeout_s):
                    while not task.state.final:
                        await changed.wait()
                        changed.clear()
                        task = await self.store.get_task(task_id)
            except TimeoutError:
                task = await self.store.get_task(task_id)
        return task

    def _finalised(self, task_id: int) -> None:
        self._changed(task_id)
        if self.on_final is not None:
            self.on_final(task_id)

    def _settle(self, task_id: int, done: Finished) -> None:
        """Tell whoever waits: the task, and the dependents its end unblocked or cancelled."""
        for changed, state in ((task_id, done.state), *done.dependents.items()):
            if state.final:
                self._finalised(changed)
            else:
                self._changed(changed)  # queued again, or released from blocked
        self.wake()

    def _changed(self, task_id: int) -> None:
        """The task changed (created, classified, started, ended, queued again): wake whoever
        waits on it and tell the live views."""
        self._watchers.notify(("task", task_id))
        self.task_changes.publish(task_id)

    def watch_task(self, task_id: int) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set whenever the task starts an execution or reaches a final state."""
        return self._watchers.watch(("task", task_id))

    def watch_execution(
        self, execution_id: int
    ) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set whenever the execution's logs grow, and when it ends."""
        return self._watchers.watch(("execution", execution_id))

    def running_execution_ids(self) -> set[int]:
        """The executions this daemon has a worker for."""
        return set(self._running_executions)

    def execution_running(self, execution_id: int) -> bool:
        """Whether this daemon is running the execution now (its log may still grow)."""
        return execution_id in self._running_executions

    def agents_state(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for name in self.known_agents:
            slot = self.agents.get(name)
            if slot is None:
                out.append({"name": name, "registered": False, "state": "unavailable",
                            "reason": self.unavailable.get(name, "not configured")})
                continue
            cooling = slot.cooldown_until > now
            paused = self.budgets.paused(name) if self.budgets else None
            busy = self._free(slot, now) == 0
            details = getattr(slot.runner, "details", None)
            state = ("cooling_down" if cooling else "paused" if paused
                     else "busy" if busy else "ready")
            out.append({
                "name": name, "registered": True, "state": state,
                "running": slot.running, "max_concurrent": slot.limit,
                "cooldown_until": slot.cooldown_until if cooling else None,
                "cooldown_remaining_s": round(slot.cooldown_until - now, 1) if cooling else None,
                "last_error": slot.last_error,
                **(details() if callable(details) else {}),
                **(self.budgets.describe(name) if self.budgets else {}),
            })
        return out

    def _free(self, slot: AgentSlot, now: float) -> int:
        """Free slots of an agent that is neither cooling down nor paused by a spend cap."""
        if self.budgets is not None and self.budgets.paused(slot.name) is not None:
            return 0
        return slot.free(now)

    # -- classification -------------------------------------------------------------------------

    def _classify_later(self, task: Task) -> None:
        job = asyncio.create_task(self._classify(task), name=f"corral-classify-{task.id}")
        self._classifying.add(job)
        job.add_done_callback(self._classifying.discard)

    def _why_unavailable(self, agent: str) -> str:
        """In the words ``corral agents`` uses."""
        return f"{agent} is unavailable: {self.unavailable.get(agent, 'not configured')}"

    async def _classify(self, task: Task) -> None:
        async with self._classify_sem:
            if self.classifier is None or not self.agents:
                agent = next(iter(self.agents), None)
                if agent is None:
                    await self._fail_unplaceable(task)
                    return
                reason = "no classifier; first registered agent"
                decision_model = None
            else:
                decision = await self.classifier.classify(task.prompt)
                agent, decision_model, reason = decision.agent, decision.model, decision.reason
            if task.requested_agent and task.requested_agent not in (AUTO, agent):
                reason = f"{self._why_unavailable(task.requested_agent)}; {reason}"
            await self.store.set_classification(
                task.id, agent=agent, model=task.requested_model or decision_model, reason=reason
            )
        self._changed(task.id)
        self.wake()

    async def _fail_unplaceable(self, task: Task) -> None:
        names = [task.requested_agent] if task.requested_agent not in (None, AUTO) else []
        names += [a for a in self.known_agents if a not in names]
        why = "; ".join(self._why_unavailable(a) for a in names if a is not None)
        self._settle(task.id, await self.store.update_task(
            task.id, state=TaskState.FAILED, error=f"no agent can run this task: {why}"))

    # -- dispatching ----------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting:
            self._wake.clear()
            try:
                delay = self._wake_delay(await self._fill())
            except Exception:  # a database hiccup must not stop dispatching for good
                log.exception("dispatcher failed; retrying")
                delay = 1.0
            # A timer rather than wait_for, which wraps the wait in a task of its own on
            # every wake-up: the dispatcher hears of a free slot one turn of the loop sooner.
            timer = loop.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _fill(self) -> float | None:
        """Start as many ready tasks as slots allow: one transaction claims a whole batch.

        Returns when the earliest delayed task becomes ready, as the last claim saw it.
        """
        ready_at = None
        if self.budgets is not None and self.budgets.stale():
            await self.budgets.refresh()
        while self._accepting and (room := self.settings.max_workers - len(self._jobs)) > 0:
            now = self.clock()
            free = {a.name: n for a in self.agents.values() if (n := self._free(a, now)) > 0}
            claim = await self.store.claim_many(free, balance, self.executions_dir, limit=room)
            ready_at = claim.next_ready_at
            folders = [Path(execution.log_dir or "") for _, execution in claim.tasks]
            if folders:
                # The batch's folders in one thread hop, off the loop: on a slow disk a folder
                # costs a millisecond. What fails here is left to the runner to report.
                await asyncio.to_thread(make_folders, folders)
            for (task, execution), folder in zip(claim.tasks, folders, strict=True):
                slot = self.agents[task.agent or ""]
                job = _Job(task, slot, execution, folder)
                if self.store.shared:
                    job.shipper = LogShipper(execution.id, folder / STDOUT_LOG,
                                             self.store.append_log)
                self._jobs[task.id] = job
                self._running_executions.add(execution.id)
                slot.running += 1
                job.worker = asyncio.create_task(self._run(job), name=f"corral-task-{task.id}")
                self._changed(task.id)
            if len(claim.tasks) < room:
                break
        return ready_at

    def _wake_delay(self, ready_at: float | None) -> float:
        """Until the next cool-down ends or delayed retry is due, whichever is first.

        The store's ``run_after`` is the one record of when a retry is due (the claim reads
        the earliest), so a restart loses no wake-up.
        """
        now = self.clock()
        moments = [a.cooldown_until for a in self.agents.values() if a.cooldown_until > now]
        if ready_at is not None:
            moments.append(ready_at)
        if self.budgets is not None and (ends := self.budgets.next_end()) is not None:
            moments.append(ends)  # a spend pause ends with its day or month
        if not moments:
            return _MAX_IDLE_WAIT_S
        return min(max(min(moments) - now, 0.01), _MAX_IDLE_WAIT_S)

    # -- running one attempt --------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        task, slot, execution = job.task, job.slot, job.execution
        where: _Where | None = None
        try:
            try:
                where = await self._prepare(job)
                result = await slot.runner.run(await self._request(job, where))
            except asyncio.CancelledError:
                # Cancelled at any point of the attempt (preparing it included): recorded.
                # What the agent changed before it was stopped is kept on the branch too.
                changes = (_Changes() if where is None
                           else await asyncio.shield(self._changes(job, where, None)))
                await asyncio.shield(self._ship_rest(job))
                await asyncio.shield(self._record_cancel(job, execution, changes))
                return
            except WorkspaceError as exc:
                result = RunResult(status=RunStatus.FAILED, error=exc.message)
            except Exception as exc:  # a runner bug or a disk failure: recorded, not fatal
                log.exception("runner %s crashed on task %s", slot.name, task.id)
                result = RunResult(status=RunStatus.FAILED,
                                   error=f"{slot.name} runner error: {type(exc).__name__}: {exc}")
            changes = (_Changes() if where is None
                       else await asyncio.shield(self._changes(job, where, result.final_text)))
            # Copied before the end is recorded: a follower elsewhere that sees the execution
            # ended has the whole log.
            await asyncio.shield(self._ship_rest(job))
            await asyncio.shield(self._record(job, execution, result, changes))
        except Exception:
            # The store failed; a restart's recovery requeues what is still marked running.
            log.exception("recording task %s failed", task.id)
        finally:
            slot.running -= 1
            self._jobs.pop(task.id, None)
            self._running_executions.discard(execution.id)
            self._watchers.notify(("execution", execution.id))
            job.done.set()
            self.wake()
            self._compress_later(job.folder / STDOUT_LOG)

    @staticmethod
    async def _ship_rest(job: _Job) -> None:
        if job.shipper is not None:
            await job.shipper.close()

    def _output(self, job: _Job) -> None:
        """The execution's log grew: its followers wake, and a shared store gets a copy."""
        self._watchers.notify(("execution", job.execution.id))
        if job.shipper is not None:
            job.shipper.poke()

    def changed_elsewhere(self, task_id: int | None, state: TaskState | None) -> None:
        """Another node stored or changed a task: waiters and live views hear of it, and a
        task that became ready may be claimed here."""
        if task_id is not None:
            self._changed(task_id)
        if state in (None, TaskState.QUEUED):
            self.wake()

    def log_grew(self, execution_id: int) -> None:
        """Another node's execution's log grew or it ended: its followers here wake."""
        self._watchers.notify(("execution", execution_id))

    def _compress_later(self, log_path: Path) -> None:
        """The finished log compressed off the event loop; its readers take either form."""
        if not logfiles.worth_compressing(log_path):  # one stat of a file just written
            return

        async def compress_it() -> None:
            try:
                await asyncio.to_thread(logfiles.compress, log_path)
            except OSError as exc:  # a full disk: the plain log stays, as readable
                log.warning("compressing %s failed: %s", log_path, exc)

        job = asyncio.create_task(compress_it(), name="corral-compress-log")
        self._compressing.add(job)
        job.add_done_callback(self._compressing.discard)

    async def _request(self, job: _Job, where: _Where) -> RunRequest:
        """What the runner is asked: the prompt, where, and how it goes on from before."""
        task, execution = job.task, job.execution
        earlier = [e for e in await self.store.executions_for(task.id) if e.id < execution.id]
        going_on = await continuation(task, execution, earlier)
        job.resumed_session = going_on.resume_session_id
        return RunRequest(
            prompt=going_on.prompt, exec_dir=job.folder, model=task.model,
            workdir=where.cwd, timeout_s=task.timeout_s,
            resume_session_id=going_on.resume_session_id, history=going_on.history,
            max_cost_usd=task.max_cost_usd,
            prior_usage=_session_usage(earlier, going_on.resume_session_id),
            on_process=self._process_recorder(execution.id),
            on_output=lambda: self._output(job),
        )

    async def _prepare(self, job: _Job) -> _Where:
        """Where the execution runs: its task's worktree (made now if need be), else the dir."""
        task = job.task
        ws = task.workspace
        if ws is not None and self.workspaces is not None:
            ready = await self.workspaces.ensure(ws)
            if ready != ws:
                await self.store.set_workspace(task.id, ready)
                task.workspace = ready
            return _Where(Path(ready.path) / ready.subdir, await self.workspaces.head(ready),
                          ready)
        cwd = Path(task.workdir) if task.workdir else None
        return _Where(cwd, await git_base(cwd), None)

    async def _changes(self, job: _Job, where: _Where, final_text: str | None) -> _Changes:
        """What the execution changed: committed on the task's branch when it has one."""
        ws = where.workspace
        if ws is None or self.workspaces is None or where.start is None:
            stat = await measure_changes(where.cwd, where.start, final_text)
            return _Changes(stat)
        summary = " ".join((job.execution.prompt or job.task.prompt).split())[:72]
        message = f"corral: task {job.task.id}, execution {job.execution.id}\n\n{summary}"
        try:
            committed: CommitStat = await self.workspaces.commit(ws, where.start, message)
        except WorkspaceError as exc:
            log.warning("task %s: committing its changes failed: %s", job.task.id, exc.message)
            return _Changes(error=f"the changes could not be committed: {exc.message}")
        files = [FileChange(path, added, deleted) for path, added, deleted in committed.files]
        stat = ChangeStat(len(files), committed.insertions, committed.deletions)
        return _Changes(stat, files, committed.commit)

    def _process_recorder(self, execution_id: int) -> Callable[[ProcessIdentity], Awaitable[None]]:
        async def record(proc: ProcessIdentity) -> None:
            await self.store.set_execution_process(execution_id, proc)

        return record

    async def _record(
        self, job: _Job, execution: Execution, result: RunResult, changes: _Changes
    ) -> None:
        task, slot = job.task, job.slot
        result.apply_changes(changes.stat)
        estimated = self._estimate_cost(result, execution)
        self._hold_to_budget(task, result)
        error = result.error
        if changes.error:
            error = f"{error}; {changes.error}" if error else changes.error
        exec_fields: dict[str, Any] = {
            "status": ExecStatus(result.status), "exit_code": result.exit_code,
            "error": error, "session_id": result.session_id, "summary": result.summary,
            "cost_usd": result.cost_usd, "cost_estimated": int(estimated),
            "tokens_in": result.tokens_in,
            "tokens_out": result.tokens_out, "files_changed": result.files_changed,
            "insertions": result.insertions, "deletions": result.deletions,
            "model": result.model or execution.model, "commit_sha": changes.commit,
            "resumed_session": job.resumed_session, "actions": result.actions,
        }
        if result.status == RunStatus.SUCCEEDED:
            slot.cooldowns_in_a_row = 0
        else:
            slot.last_error = result.error
        task_fields = self._next_task_state(task, slot, result, self.clock())
        done = await self.store.finish(execution.id, task.id, execution=exec_fields,
                                       task=task_fields, files=changes.files)
        if self.budgets is not None:
            await self.budgets.refresh()  # this execution's spend may pause its agent
        self._settle(task.id, done)

    def _estimate_cost(self, result: RunResult, execution: Execution) -> bool:
        """A cost from [prices] and the tokens, where the agent reported none."""
        price = self.prices.get(result.model or execution.model or "")
        if result.cost_usd is not None or price is None or result.tokens_in is None:
            return False
        result.cost_usd = price.cost_usd(result.tokens_in, result.tokens_out or 0,
                                         result.cached_tokens)
        return True

    def _hold_to_budget(self, task: Task, result: RunResult) -> None:
        """An execution whose cost passed its task's cap failed, whatever it did."""
        cap = task.max_cost_usd
        if (cap is None or result.budget_reached or result.cost_usd is None
                or result.cost_usd < cap):
            return
        if result.status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
            result.status, result.retryable = RunStatus.FAILED, False
            result.error = f"budget of ${cap:g} reached (it cost ${result.cost_usd:.4f})"

    def _next_task_state(
        self, task: Task, slot: AgentSlot, result: RunResult, now: float
    ) -> dict[str, Any]:
        """What becomes of the task after this attempt (the store's fields to change)."""
        if result.status == RunStatus.SUCCEEDED:
            return {"state": TaskState.SUCCEEDED, "error": None}
        if result.status == RunStatus.RATE_LIMITED:
            cool_s = self._cool_down(slot, result, now)
            requeues = task.rate_limit_requeues + 1
            if requeues > self.settings.max_rate_limit_requeues:
                reset = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now + cool_s))
                return {"state": TaskState.FAILED, "rate_limit_requeues": requeues - 1,
                        "error": f"rate limited {requeues} times; last reset {reset}"}
            # Not the task's fault: it goes back to the queue without spending an attempt.
            return {"state": TaskState.QUEUED, "attempts": task.attempts - 1,
                    "rate_limit_requeues": requeues, "error": result.error}
        if result.status == RunStatus.TIMED_OUT:
            # The daemon stopped the run at its time limit: a cancellation, with the reason
            # in the error and the partial log kept; the execution says timed_out.
            return {"state": TaskState.CANCELLED, "error": result.error}
        if result.retryable and task.attempts <= task.max_retries:
            delay = backoff_delay(task.attempts, base_s=self.settings.retry_base_seconds,
                                  cap_s=self.settings.retry_max_seconds)
            return {"state": TaskState.QUEUED, "run_after": now + delay, "error": result.error}
        return {"state": TaskState.FAILED, "error": result.error}

    def _cool_down(self, slot: AgentSlot, result: RunResult, now: float) -> float:
        """Pause the agent after a rate limit; returns for how many seconds."""
        slot.cooldowns_in_a_row += 1
        seconds = result.retry_after_s
        if seconds is None:
            seconds = backoff_delay(slot.cooldowns_in_a_row,
                                    base_s=self.settings.cooldown_default_seconds,
                                    cap_s=self.settings.cooldown_default_seconds * 16)
        slot.cooldown_until = max(slot.cooldown_until, now + seconds)
        log.warning("agent %s rate limited; cooling down for %.1fs", slot.name, seconds)
        return seconds

    async def _record_cancel(self, job: _Job, execution: Execution, changes: _Changes) -> None:
        task = job.task
        if job.cancel_reason == "cancelled":
            task_fields: dict[str, Any] = {"state": TaskState.CANCELLED,
                                           "error": "cancelled while running"}
            status = ExecStatus.CANCELLED
        else:  # shutdown: the task goes back to the queue, the attempt is not counted
            task_fields = {"state": TaskState.QUEUED, "attempts": task.attempts - 1,
                           "error": None}
            status = ExecStatus.INTERRUPTED
        stat = changes.stat
        self._settle(task.id, await self.store.finish(
            execution.id, task.id, task=task_fields, files=changes.files,
            execution={"status": status, "error": task_fields["error"] or "daemon shutdown",
                       "commit_sha": changes.commit, "resumed_session": job.resumed_session,
                       "files_changed": stat.files_changed if stat else None,
                       "insertions": stat.insertions if stat else None,
                       "deletions": stat.deletions if stat else None},
        ))


def _session_usage(earlier: list[Execution], session_id: str | None) -> tuple[int, int]:
    """Tokens the earlier executions of a session used (in, out)."""
    if session_id is None:
        return 0, 0
    same = [e for e in earlier if e.session_id == session_id]
    return sum(e.tokens_in or 0 for e in same), sum(e.tokens_out or 0 for e in same)


@dataclass(frozen=True, slots=True)
class _Where:
    """Where an execution runs, and the commit its changes are measured from."""

    cwd: Path | None
    start: str | None
    workspace: Workspace | None


@dataclass(frozen=True, slots=True)
class _Changes:
    stat: ChangeStat | None = None
    files: list[FileChange] = field(default_factory=list)
    commit: str | None = None
    error: str | None = None
