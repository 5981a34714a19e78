"""The socket API: an aiohttp application served on a Unix socket.

Every error is JSON ``{"error": {"code", "message"}}`` with a 4xx status saying what was wrong;
an unexpected exception is logged and answered with a 500 in the same shape, and the daemon
keeps serving. :data:`ROUTES` is the one list of what the API offers: the router and the
OpenAPI description (``/openapi.json``) are both built from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from corral.errors import BadRequest, CorralError, NotFound, PayloadTooLarge
from corral.executor.landing import Landing
from corral.executor.logfiles import open_log
from corral.executor.pool import Pool
from corral.executor.runner import STDERR_LOG, STDOUT_LOG
from corral.host.peercred import peer_uid as socket_peer_uid
from corral.models import Execution, Task
from corral.retention import PruneReport, Retention
from corral.schedule import Scheduler
from corral.server.openapi import Route, openapi_spec
from corral.server.schemas import (
    DiffQuery,
    ListQuery,
    LogQuery,
    MergeRequest,
    PruneRequest,
    ReplyCreate,
    ScheduleCreate,
    StatsQuery,
    TaskCreate,
    TaskList,
    WaitQuery,
    parse_query,
    validation_message,
)
from corral.storage.base import Store, TaskFilter

log = logging.getLogger(__name__)

POOL_KEY = web.AppKey("pool", Pool)
STORE_KEY = web.AppKey("store", Store)
LANDING_KEY = web.AppKey("landing", Landing)
SCHEDULER_KEY = web.AppKey("scheduler", Scheduler)
RETENTION_KEY = web.AppKey("retention", Retention)
UI_KEY: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("ui")
SPEC_KEY = web.AppKey("openapi", dict)
_READ_CHUNK_BYTES = 256 * 1024
_FOLLOW_BACKSTOP_S = 5.0  # following another node's log: a missed notification costs this


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def api_middleware(
    request: web.Request, handler: Any
) -> web.StreamResponse:
    """Only the daemon's own user (or root) may talk to it; every error becomes a JSON reply.

    One middleware, not two: each layer costs a coroutine per request.
    """
    uid = peer_uid(request)
    if uid is not None and uid != 0 and uid != _OWN_UID:
        return _error(403, "forbidden", "only the daemon's own user may use this socket")
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except CorralError as exc:
        return web.json_response({"error": exc.to_dict()}, status=exc.http_status)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, PayloadTooLarge.code, f"request body is too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return _error(exc.status, code, f"{exc.reason}: {request.method} {request.path}")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error(500, "internal", "internal error; see the daemon's log")


_OWN_UID = os.getuid()
# Peer credentials per connection: they cannot change while it is open, and a keep-alive
# client sends many requests on one.
_PEER_UIDS: weakref.WeakKeyDictionary[asyncio.BaseTransport, int | None] = (
    weakref.WeakKeyDictionary())


def peer_uid(request: web.Request) -> int | None:
    transport = request.transport
    if transport is None:
        return None
    try:
        return _PEER_UIDS[transport]
    except (KeyError, TypeError):
        pass
    sock = transport.get_extra_info("socket")
    uid = None if sock is None else socket_peer_uid(sock)
    with contextlib.suppress(TypeError):  # a transport that cannot be weakly referenced
        _PEER_UIDS[transport] = uid
    return uid


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8", code="malformed_json") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="malformed_json") from None


def _task_id(request: web.Request) -> int:
    raw = request.match_info["task_id"]
    # isascii too: "²".isdigit() is true, but it is no number int() reads.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise NotFound(f"task {raw!r} does not exist")
    return int(raw)


def _task_json(task: Task, status: int = 200) -> web.Response:
    return web.json_response(task.to_dict(), status=status)


async def create_task(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if "prompt" not in body:
        raise BadRequest("prompt is required", code="missing_prompt")
    try:
        spec = TaskCreate.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc), code="invalid_task") from None
    # Shielded: a client that hangs up must not leave a stored task unclassified.
    task = await asyncio.shield(request.app[POOL_KEY].submit(
        spec.prompt, agent=spec.agent, model=spec.model, workdir=spec.workdir,
        priority=spec.priority, max_retries=spec.max_retries, timeout_s=spec.timeout_s,
        isolate=spec.isolate, base_ref=spec.base, after=spec.after,
        max_cost_usd=spec.max_cost_usd, node=spec.node,
    ))
    return _task_json(task, 201)


async def _body(request: web.Request, model: type[Any]) -> Any:
    body = await _json_body(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc), code="invalid_body") from None


async def reply_task(request: web.Request) -> web.Response:
    spec: ReplyCreate = await _body(request, ReplyCreate)
    return _task_json(await asyncio.shield(
        request.app[POOL_KEY].reply(_task_id(request), spec.prompt)))


async def diff_task(request: web.Request) -> web.Response:
    query = parse_query(DiffQuery, request.query)
    text = await request.app[LANDING_KEY].diff(_task_id(request), stat=query.stat)
    return web.Response(text=text, content_type="text/x-diff")


async def merge_task(request: web.Request) -> web.Response:
    spec: MergeRequest = await _body(request, MergeRequest)
    # Shielded: half a merge is never left behind by a client that hung up.
    return web.json_response(await asyncio.shield(
        request.app[LANDING_KEY].merge(_task_id(request), squash=spec.squash)))


async def discard_task(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.shield(
        request.app[LANDING_KEY].discard(_task_id(request))))


async def ui(request: web.Request) -> web.Response:
    return web.json_response(request.app[UI_KEY]())


async def prune(request: web.Request) -> web.Response:
    spec: PruneRequest = await _body(request, PruneRequest)
    report = await asyncio.shield(request.app[RETENTION_KEY].prune(spec.older_than_days,
                                                                   dry_run=spec.dry_run))
    return web.json_response(report.to_dict())


async def add_schedule(request: web.Request) -> web.Response:
    spec: ScheduleCreate = await _body(request, ScheduleCreate)
    if spec.agent is not None:
        request.app[POOL_KEY].check_agent(spec.agent)
    schedule = await request.app[SCHEDULER_KEY].add(spec.cron, spec.prompt, spec.task_options())
    return web.json_response(schedule.to_dict(), status=201)


async def list_schedules(request: web.Request) -> web.Response:
    schedules = await request.app[SCHEDULER_KEY].list()
    return web.json_response({"schedules": [s.to_dict() for s in schedules]})


async def remove_schedule(request: web.Request) -> web.Response:
    raw = request.match_info["schedule_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise NotFound(f"schedule {raw!r} does not exist")
    await request.app[SCHEDULER_KEY].remove(int(raw))
    return web.json_response({"removed": int(raw)})


async def workspaces(request: web.Request) -> web.Response:
    return web.json_response({"workspaces": await request.app[LANDING_KEY].list()})


async def list_tasks(request: web.Request) -> web.Response:
    query = parse_query(ListQuery, request.query)
    where = TaskFilter(state=query.state, agent=query.agent, since=query.timestamp(query.since),
                       until=query.timestamp(query.until), before=query.before)
    page = await request.app[STORE_KEY].list_tasks(where, limit=query.limit)
    return web.json_response({"tasks": [t.to_dict() for t in page.tasks], "next": page.next})


async def show_task(request: web.Request) -> web.Response:
    return _task_json(await request.app[STORE_KEY].get_task(_task_id(request),
                                                            with_executions=True))


async def wait_task(request: web.Request) -> web.Response:
    query = parse_query(WaitQuery, request.query)
    task_id = _task_id(request)
    await request.app[POOL_KEY].wait_final(task_id, float(query.timeout_s))
    return _task_json(await request.app[STORE_KEY].get_task(task_id, with_executions=True))


async def cancel_task(request: web.Request) -> web.Response:
    return _task_json(await asyncio.shield(request.app[POOL_KEY].cancel(_task_id(request))))


async def retry_task(request: web.Request) -> web.Response:
    task, cancelled = await asyncio.shield(request.app[POOL_KEY].retry(_task_id(request)))
    data = task.to_dict()
    if cancelled:
        data["note"] = (f"the tasks waiting for it ({', '.join(map(str, cancelled))}) were"
                        " cancelled when it ended and stay cancelled; submit them again")
    return web.json_response(data)


async def task_log(request: web.Request) -> web.StreamResponse:
    """The envelope of a task's execution (the latest by default), optionally followed live.

    Following wakes on the pool's own events (the log grew, the execution ended), never on a
    timer, and ends when the client hangs up (the handler is cancelled). Files are read off
    the event loop.
    """
    query = parse_query(LogQuery, request.query)
    pool = request.app[POOL_KEY]
    store = request.app[STORE_KEY]
    execution = await _execution_to_show(pool, store, _task_id(request), query)
    elsewhere = execution.node_id not in (None, store.node_id) and store.shared
    if elsewhere and query.stream == "stderr":
        raise NotFound(f"execution {execution.id} ran on node {execution.node_id}; its"
                       " stderr.log is on that node")
    path = Path(execution.log_dir or "") / (STDERR_LOG if query.stream == "stderr" else STDOUT_LOG)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if elsewhere:
        await _send_copy(response, pool, store, execution.id, follow=query.follow)
        await response.write_eof()
        return response
    with pool.watch_execution(execution.id) as grew:
        offset = 0
        while True:
            grew.clear()
            running = query.follow and pool.execution_running(execution.id)
            offset = await _send_from(response, path, offset)
            if not running:
                break
            await grew.wait()
    await response.write_eof()
    return response


async def _send_copy(response: web.StreamResponse, pool: Pool, store: Store,
                     execution_id: int, *, follow: bool) -> None:
    """Another node's execution: its log from the store's copy, followed by the store's
    notifications (a slow poll only as the backstop for one that was missed)."""
    seq = -1
    with pool.watch_execution(execution_id) as grew:
        while True:
            grew.clear()
            # Read before the chunks: the copy is complete before an end is recorded.
            running = follow and (await store.get_execution(execution_id)).status == "running"
            while chunks := await store.read_log(execution_id, seq):
                for seq, data in chunks:  # noqa: B007 (the last one is the cursor)
                    await response.write(data)
            if not running:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FOLLOW_BACKSTOP_S):
                    await grew.wait()


async def _execution_to_show(pool: Pool, store: Store, task_id: int, query: LogQuery) -> Execution:
    """The asked-for execution; when following a task not yet started, waits for its first."""
    with pool.watch_task(task_id) as changed:
        while True:
            changed.clear()
            task = await store.get_task(task_id, with_executions=True)  # 404 if there is none
            if task.executions:
                break
            if not query.follow or task.state.final:
                raise NotFound(f"task {task_id} has no execution yet")
            await changed.wait()
    wanted = query.execution or task.executions[-1].id
    for execution in task.executions:
        if execution.id == wanted:
            return execution
    raise NotFound(f"execution {wanted} does not belong to task {task_id}")


async def _send_from(response: web.StreamResponse, path: Path, offset: int) -> int:
    """Send what the log holds past ``offset`` (plain or, once finished, compressed); returns
    the new offset. The file stays open while it is sent: a compressed one is read once."""
    try:
        fh = await asyncio.to_thread(open_log, path)
    except FileNotFoundError:
        return offset
    try:
        await asyncio.to_thread(fh.seek, offset)
        while chunk := await asyncio.to_thread(fh.read, _READ_CHUNK_BYTES):
            await response.write(chunk)
            offset += len(chunk)
    finally:
        fh.close()
    return offset


async def agents(request: web.Request) -> web.Response:
    return web.json_response({"agents": request.app[POOL_KEY].agents_state()})


async def nodes(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response({"this": store.node_id, "nodes": await store.nodes()})


async def stats(request: web.Request) -> web.Response:
    query = parse_query(StatsQuery, request.query)
    store = request.app[STORE_KEY]
    if query.by is None:
        return web.json_response(await store.stats())
    return web.json_response({"by": query.by, "since": query.since,
                              "groups": await store.usage(query.by, query.since)})


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    return web.json_response({"status": "ok" if pool.accepting else "stopping", "pid": os.getpid()})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[SPEC_KEY])


ROUTES = (
    Route("POST", "/tasks", create_task, "createTask", "Queue a task.",
          body=TaskCreate, response=Task, ok_status=201, errors=(400, 413, 503)),
    Route("GET", "/tasks", list_tasks, "listTasks", "Tasks, newest first.",
          query=ListQuery, response=TaskList, errors=(400,)),
    Route("GET", "/tasks/{task_id}", show_task, "showTask", "A task with its executions.",
          response=Task, errors=(404,)),
    Route("GET", "/tasks/{task_id}/wait", wait_task, "waitTask",
          "The task once it is final, or as it is when timeout_s runs out.",
          query=WaitQuery, response=Task, errors=(400, 404)),
    Route("POST", "/tasks/{task_id}/cancel", cancel_task, "cancelTask",
          "Cancel a queued or running task.", response=Task, errors=(404, 409)),
    Route("POST", "/tasks/{task_id}/retry", retry_task, "retryTask",
          "Queue a finished task again.", response=Task, errors=(404, 409)),
    Route("POST", "/tasks/{task_id}/reply", reply_task, "replyTask",
          "A follow-up in the same conversation and workspace (queued if the task runs).",
          body=ReplyCreate, response=Task, errors=(400, 404, 503)),
    Route("GET", "/tasks/{task_id}/diff", diff_task, "taskDiff",
          "The task's branch against the commit it started from, as a patch or a stat.",
          query=DiffQuery, content_type="text/x-diff", errors=(400, 404, 409)),
    Route("POST", "/tasks/{task_id}/merge", merge_task, "mergeTask",
          "Merge the task's branch into the branch checked out in the repository; refused"
          " (tree untouched) on a conflict or uncommitted changes in the files it touched.",
          body=MergeRequest, errors=(400, 404, 409)),
    Route("POST", "/tasks/{task_id}/discard", discard_task, "discardTask",
          "Remove the task's worktree and branch.", errors=(404, 409)),
    Route("POST", "/schedules", add_schedule, "addSchedule",
          "A cron schedule that submits a task at each firing.", body=ScheduleCreate,
          ok_status=201, errors=(400,)),
    Route("GET", "/schedules", list_schedules, "listSchedules",
          "Schedules, with their last and next firing."),
    Route("DELETE", "/schedules/{schedule_id}", remove_schedule, "removeSchedule",
          "Remove a schedule (its tasks stay).", errors=(404,)),
    Route("GET", "/ui", ui, "ui",
          "The dashboard's URL with its token (the socket is its owner's alone), or why it is"
          " off."),
    Route("POST", "/prune", prune, "prune",
          "Remove finished tasks older than older_than_days (else [daemon] keep_days) with"
          " their executions and logs; what was spent stays in the usage counters.",
          body=PruneRequest, response=PruneReport, errors=(400,)),
    Route("GET", "/workspaces", workspaces, "workspaces",
          "Each workspace: task, branch, state, ahead/behind, disk use."),
    Route("GET", "/tasks/{task_id}/log", task_log, "taskLog",
          "An execution's log as stream-json lines, optionally followed live.",
          query=LogQuery, content_type="application/x-ndjson", errors=(400, 404)),
    Route("GET", "/agents", agents, "agents", "Agents, their slots and cool-downs."),
    Route("GET", "/nodes", nodes, "nodes",
          "The daemons on this queue (several with a PostgreSQL store): id, host, pid,"
          " heartbeat, agents; which one answers."),
    Route("GET", "/stats", stats, "stats",
          "Counts, cost and tokens; with by=day|agent|model, per group (since a day).",
          query=StatsQuery, errors=(400,)),
    Route("GET", "/health", health, "health", "Whether the daemon takes work."),
    Route("GET", "/openapi.json", openapi, "openapi", "This description."),
)


def build_app(
    pool: Pool, store: Store, landing: Landing, scheduler: Scheduler, retention: Retention, *,
    max_request_bytes: int, ui_status: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[api_middleware])
    app[POOL_KEY] = pool
    app[STORE_KEY] = store
    app[LANDING_KEY] = landing
    app[SCHEDULER_KEY] = scheduler
    app[RETENTION_KEY] = retention
    app[UI_KEY] = ui_status or (lambda: {"enabled": False, "url": None,
                                         "error": "[ui] enabled is false"})
    app[SPEC_KEY] = openapi_spec(ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    return app
