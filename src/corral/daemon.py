"""Wiring: config → store → llm client → runners → classifier → pool → server → signals.

Shutdown runs in stages: stop taking work, let running tasks finish within the grace period,
cancel the rest (their tasks go back to the queue), kill process groups, close the store and
remove the socket. Signal handlers only set an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from corral.config import Settings
from corral.errors import ConfigError
from corral.executor.agent.tools import BashLimits
from corral.executor.budget import Budgets
from corral.executor.classifier import Classifier
from corral.executor.claude import ClaudeRunner
from corral.executor.codex import CodexRunner
from corral.executor.gemini import GeminiRunner
from corral.executor.generic import GenericRunner
from corral.executor.landing import Landing
from corral.executor.local import AgentOptions, LocalRunner
from corral.executor.pool import Pool
from corral.executor.proc import kill_group, resolve_binary
from corral.executor.runner import Runner
from corral.host import procs, sandbox
from corral.llm.client import Client
from corral.models import ProcessIdentity
from corral.notify import Notifier
from corral.retention import Retention
from corral.schedule import Scheduler
from corral.server.app import build_app
from corral.storage.base import Store
from corral.storage.postgres import PostgresStore
from corral.storage.sqlite import SqliteStore
from corral.ui.app import Dashboard
from corral.workspace.manager import Workspaces

log = logging.getLogger("corral")
# Allocations between young-generation collections (CPython defaults to 700).
GC_GEN0_THRESHOLD = 7000
# How often idle worktrees past [workspace] keep_days are looked for (also at every start).
CLEANUP_EVERY_S = 3600.0
ORPHAN_AFTER_S = 60.0
STOP_WRITE_SLACK_S = 5.0  # an execution this old with no worker is an orphan


class SocketInUse(ConfigError):
    code = "socket_in_use"


class UnsafeSocketFolder(ConfigError):
    code = "unsafe_socket_folder"


def check_socket_folder(folder: Path) -> None:
    """Make the socket's folder 0700 if it is absent; refuse one another user could tamper with.

    As tmux and ssh-agent do: a folder owned by someone else, or open to the group or to
    others, lets them replace the socket with their own and read every prompt the CLI sends.
    Nobody else's folder is ever chmod-ed.
    """
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder, 0o700)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSocketFolder(f"socket folder {folder} is not a folder (a symlink?)")
    if info.st_uid != os.getuid():
        raise UnsafeSocketFolder(
            f"socket folder {folder} belongs to uid {info.st_uid}, not to this user"
            f" ({os.getuid()}); remove it or set [daemon] socket_path elsewhere")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UnsafeSocketFolder(
            f"socket folder {folder} is open to other users"
            f" (mode {stat.S_IMODE(info.st_mode):o}); make it 0700 (chmod 700 {folder})")


def prepare_socket(path: Path) -> None:
    """Check the socket's folder and clear a stale socket; refuse a live one."""
    check_socket_folder(path.parent)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
        path.unlink(missing_ok=True)  # stale: its daemon is gone
        return
    finally:
        probe.close()
    raise SocketInUse(f"another corral daemon is already serving on {path}")


class DataDirInUse(ConfigError):
    code = "data_dir_in_use"


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data folder for the daemon's life.

    A second daemon on the same database would take the first one's running executions for
    leftovers of a crash and requeue them; the lock makes it refuse to start instead.
    """
    fd = os.open(data_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"another corral daemon is already using {data_dir}") from None
    return fd


@dataclass(slots=True)
class Agents:
    runners: dict[str, Runner]
    unavailable: dict[str, str]
    client: Client | None


async def agent_options(settings: Settings) -> AgentOptions:
    """[local_agent] as the runner takes it, with the sandbox probed once, here and now."""
    la = settings.local_agent
    binary, in_force, missing = None, "none", None
    if la.sandbox != "none":
        found = sandbox.find()
        why = f"{sandbox.BINARY} is not installed" if found is None else await sandbox.probe(found)
        if why is None:
            binary, in_force = found, "bwrap"
        elif la.sandbox == "required":
            missing = why
            in_force = f"required but unavailable: {why}"
        else:
            in_force = f"none ({why})"
            log.warning("the local agent's commands run without a sandbox: %s", why)
    return AgentOptions(
        mode=la.mode, actions=la.actions, max_turns=la.max_turns,
        bash=BashLimits(default_timeout_s=la.bash_timeout_seconds,
                        max_timeout_s=la.max_bash_timeout_seconds,
                        output_limit_chars=la.output_limit_chars,
                        kill_grace_s=settings.pool.kill_grace_seconds),
        sandbox_binary=binary, sandbox=in_force, sandbox_missing=missing)


def build_runners(
    settings: Settings, env: Mapping[str, str], agent_options: AgentOptions | None = None
) -> Agents:
    runners: dict[str, Runner] = {}
    unavailable: dict[str, str] = {}
    client = None
    lm = settings.local_model
    if lm.endpoint:
        # No total bound of the client's own: a task's timeout (else the agent's default,
        # [local_model] timeout_seconds) is the one bound on a run, the classifier has its own.
        client = Client(
            lm.endpoint, lm.model, lm.api_key.get_secret_value() if lm.api_key else None,
            connect_timeout_s=lm.connect_timeout_seconds, idle_timeout_s=lm.idle_timeout_seconds,
        )
        runners["local"] = LocalRunner(client, timeout_s=lm.timeout_seconds,
                                       temperature=lm.default_temperature,
                                       max_tokens=lm.max_tokens, agent=agent_options,
                                       prices=settings.prices)
    else:
        unavailable["local"] = "[local_model] endpoint is empty"
    grace = settings.pool.kill_grace_seconds
    cl, ge, co = settings.claude, settings.gemini, settings.codex
    candidates: list[tuple[str, bool, Runner]] = [
        ("claude", cl.enabled, ClaudeRunner(
            binary=cl.binary, model=cl.model, extra_args=cl.extra_args,
            timeout_s=cl.timeout_seconds, env={**env, **cl.env}, kill_grace_s=grace,
            max_rate_limit_retries=cl.max_rate_limit_retries,
            permission_mode=cl.permission_mode, strip_api_key=cl.strip_api_key)),
        ("gemini", ge.enabled, GeminiRunner(
            binary=ge.binary, model=ge.model, extra_args=ge.extra_args,
            timeout_s=ge.timeout_seconds, env={**env, **ge.env}, kill_grace_s=grace,
            max_rate_limit_retries=ge.max_rate_limit_retries, approval_mode=ge.approval_mode)),
        ("codex", co.enabled, CodexRunner(
            binary=co.binary, model=co.model, extra_args=co.extra_args,
            timeout_s=co.timeout_seconds, env={**env, **co.env}, kill_grace_s=grace,
            max_rate_limit_retries=co.max_rate_limit_retries, sandbox=co.sandbox)),
    ]
    candidates += [(name, agent.enabled, GenericRunner(
        name, agent, env={**env, **agent.env}, kill_grace_s=grace))
        for name, agent in settings.agents.items()]
    for name, enabled, runner in candidates:
        table = f"agents.{name}" if name in settings.agents else name
        reason = None if enabled else f"disabled in [{table}]"
        reason = reason or runner.unavailable_reason()
        if settings.pool.max_concurrent.for_agent(name) == 0:
            reason = f"[pool.max_concurrent] {name} is 0"
        if reason:
            unavailable[name] = reason
        else:
            runners[name] = runner
    if settings.pool.max_concurrent.local == 0 and "local" in runners:
        unavailable["local"] = "[pool.max_concurrent] local is 0"
        del runners["local"]
    return Agents(runners, unavailable, client)


def build_classifier(settings: Settings, agents: Agents, env: Mapping[str, str]) -> Classifier:
    gemini_binary = None
    if agents.client is None and resolve_binary(settings.gemini.binary, env):
        gemini_binary = settings.gemini.binary
    return Classifier(
        registered=list(agents.runners), default_agent=settings.classifier.default_agent,
        timeout_s=settings.classifier.timeout_seconds, enabled=settings.classifier.enabled,
        client=agents.client, gemini_binary=gemini_binary,
        gemini_model=settings.gemini.model or None, gemini_env={**env, **settings.gemini.env},
        descriptions={name: a.description for name, a in settings.agents.items() if a.description},
    )


def kill_orphans(recorded: list[ProcessIdentity]) -> int:
    """Kill process groups left by executions of a daemon that died; returns how many.

    Only a group whose leader is exactly the process that daemon started (same pid, start
    time and boot) is killed: a pid reused by an unrelated process is left alone.
    """
    return sum(1 for proc in recorded
               if procs.is_alive_and_same(proc) and kill_group(proc.pgid, signal.SIGKILL))


def open_store(settings: Settings, clock: Callable[[], float]) -> Store:
    """The store the settings name: PostgreSQL for ``[store] url``, else the SQLite file."""
    node_id = settings.daemon.node()
    if settings.store.url:
        s = settings.store
        return PostgresStore(s.url, node_id=node_id, clock=clock, heartbeat_s=s.heartbeat_seconds,
                             node_timeout_s=s.node_timeout_seconds,
                             global_max_concurrent=settings.pool.global_max_concurrent,
                             reconnect_s=s.reconnect_seconds)
    return SqliteStore(settings.daemon.data_dir / "corral.db",
                       synchronous=settings.daemon.sqlite_synchronous, clock=clock,
                       node_id=node_id)


@contextlib.asynccontextmanager
async def running_daemon(
    settings: Settings, env: Mapping[str, str] | None = None, *,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Pool]:
    """Everything started and serving; leaving the block shuts it all down in stages."""
    env = dict(os.environ if env is None else env)
    socket_path = settings.daemon.socket_path
    prepare_socket(socket_path)
    data_dir = settings.daemon.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    agents = build_runners(settings, env, await agent_options(settings))
    if not agents.runners:
        log.warning("no agent is available: %s", agents.unavailable)
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(os.close, lock_data_dir(data_dir))  # released last, after the store
        store = open_store(settings, clock)
        await store.open()
        stack.push_async_callback(store.close)
        # Kill what a dead daemon left running first, so no orphan edits files while its
        # task is requeued; then record the interruption.
        killed = kill_orphans(await store.running_processes())
        interrupted = await store.recover_interrupted()
        if interrupted:
            log.warning("recovered %d executions interrupted by a previous daemon (%d process"
                        " groups killed)", interrupted, killed)
        if agents.client is not None:
            await stack.enter_async_context(agents.client)
        classifier = build_classifier(settings, agents, env) if agents.runners else None
        ws = settings.workspace
        workspaces = Workspaces(ws.root or data_dir / "worktrees", branch_prefix=ws.branch_prefix,
                                copy=ws.copy_globs, delete_merged=ws.delete_merged)
        landing = Landing(store, workspaces, keep_days=ws.keep_days)
        try:  # `git worktree prune`, idle worktrees; a failure here must not stop the daemon
            await landing.cleanup()
        except Exception:
            log.exception("cleaning up workspaces at startup failed")
        notifier = await stack.enter_async_context(Notifier(store, settings.notify))
        pool = Pool(store, agents.runners, classifier, settings.pool, data_dir / "executions",
                    unavailable=agents.unavailable, grace_s=settings.daemon.shutdown_grace_seconds,
                    workspaces=workspaces, isolate_default=ws.isolate,
                    on_final=notifier.task_finished, clock=clock,
                    budgets=Budgets(store, settings.budget, clock=clock), prices=settings.prices,
                    known_agents=settings.agent_names())
        store.on_task(pool.changed_elsewhere)  # tasks stored and changed by other nodes
        store.on_log(pool.log_grew)  # their logs, for followers here
        store.on_cancel(pool.cancel_requested)  # cancels asked for on other nodes
        scheduler = Scheduler(store, pool.submit, clock=clock)
        retention = Retention(store, data_dir / "executions", settings.daemon.keep_days,
                              clock=clock)
        dashboard = (Dashboard(settings.ui.host, settings.ui.port,
                               socket_path.parent / "ui-token") if settings.ui.enabled else None)

        def api() -> web.Application:  # one for the socket, one under the dashboard's /api/
            return build_app(pool, store, landing, scheduler, retention,
                             max_request_bytes=settings.daemon.max_request_bytes,
                             ui_status=dashboard.status if dashboard else None)

        app = api()
        # A handler whose client has gone is cancelled: a follower of a log stops at once.
        # Handlers that change state shield that work (server.app).
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        stack.callback(socket_path.unlink, missing_ok=True)
        stack.push_async_callback(runner.cleanup)
        # The pool starts before the socket exists, so the first client finds it taking work;
        # it is entered after the server's cleanup, so on the way out it stops first and
        # clients get a 503 meanwhile, not a refused connection.
        await stack.enter_async_context(pool)
        # On the way out, before the pool stops: a store that lost its server is waited for
        # through the stop's grace, not for the minutes a running daemon would wait (what is
        # not written then is recovered at the next start).
        stack.callback(store.stop_waiting_after,
                       settings.daemon.shutdown_grace_seconds + settings.pool.kill_grace_seconds
                       + STOP_WRITE_SLACK_S)
        await stack.enter_async_context(scheduler)  # stops before the pool on the way out
        # A deep backlog: a burst of clients (scripts, other agents) must queue, not fail.
        site = web.UnixSite(runner, str(socket_path), backlog=4096)
        await site.start()
        os.chmod(socket_path, 0o600)
        if dashboard is not None:
            stack.push_async_callback(dashboard.close)  # stops before the pool on the way out
            await dashboard.start(api(), pool, store, landing)
        async def release_orphans() -> None:
            # A claim committed but answered by a lost connection left executions no worker
            # holds (PostgreSQL); they go back to the queue.
            if released := await store.release_orphans(pool.running_execution_ids(),
                                                       clock() - ORPHAN_AFTER_S):
                log.warning("%d executions had no worker; their tasks are queued again",
                            released)

        orphans = asyncio.create_task(_every(ORPHAN_AFTER_S, release_orphans),
                                      name="corral-orphans")
        stack.callback(orphans.cancel)
        cleaner = asyncio.create_task(_every(CLEANUP_EVERY_S, landing.cleanup),
                                      name="corral-workspace-cleanup")
        stack.callback(cleaner.cancel)
        # Retention runs once right away (in the background: startup never waits on history),
        # then hourly.
        pruner = asyncio.create_task(_every(CLEANUP_EVERY_S, retention.keep, first_s=0.0),
                                     name="corral-retention")
        stack.callback(pruner.cancel)
        log.info("corral serving on %s with agents %s", socket_path,
                 ", ".join(agents.runners) or "none")
        yield pool


async def _every(seconds: float, job: Callable[[], Awaitable[object]], *,
                 first_s: float | None = None) -> None:
    """Run ``job`` every ``seconds`` (the first time after ``first_s``, default ``seconds``)
    until cancelled; a failure is logged, not fatal."""
    wait_s = seconds if first_s is None else first_s
    while True:
        await asyncio.sleep(wait_s)
        wait_s = seconds
        try:
            await job()
        except Exception:
            log.exception("periodic %s failed", getattr(job, "__name__", "job"))


def _tune_gc() -> None:
    """Keep garbage collection out of the request path.

    What startup built (modules, settings, schemas) lives as long as the daemon; frozen, the
    collector never walks it again, which otherwise costs a multi-millisecond pause mid-burst.
    A higher first threshold means fewer collections while a burst allocates short-lived
    request objects; reference cycles are still collected, only in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with running_daemon(settings):
            _tune_gc()
            await stop.wait()
            log.info("stopping: finishing running tasks for up to %gs",
                     settings.daemon.shutdown_grace_seconds)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("corral stopped")
    return 0
