"""The socket API: an aiohttp application served on a Unix socket.

Every error is JSON ``{"error": {"code", "message"}}`` with a 4xx status saying what was wrong;
an unexpected exception is logged and answered with a 500 in the same shape, and the daemon
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.errors import BadRequest, CorralError, NotFound, PayloadTooLarge
from corral.executor.pool import Pool
from corral.executor.runner import STDERR_LOG, STDOUT_LOG
from corral.models import ExecStatus, TaskState
from corral.server.openapi import openapi_spec
from corral.storage.store import Store

log = logging.getLogger(__name__)

POOL_KEY = web.AppKey("pool", Pool)
STORE_KEY = web.AppKey("store", Store)
MAX_WAIT_S = 60.0
FOLLOW_POLL_S = 0.05
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TaskCreate(BaseModel):
    """The body of ``POST /tasks``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    agent: str | None = None
    model: str | None = Field(default=None, max_length=200)
    workdir: str | None = None
    priority: int = Field(default=0, ge=-1000, le=1000)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    max_retries: int | None = Field(default=None, ge=0, le=100)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        if "\x00" in value:
            raise ValueError("prompt contains NUL characters")
        return value

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            raise ValueError("workdir must be an absolute path")
        if not path.exists():
            raise ValueError(f"workdir {value} does not exist")
        if not path.is_dir():
            raise ValueError(f"workdir {value} is not a directory")
        return str(path)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{key}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only the daemon's own user (or root) may talk to it; every error becomes a JSON reply.

    One middleware, not two: each layer costs a coroutine per request.
    """
    uid = peer_uid(request)
    if uid is not None and uid != 0 and uid != _OWN_UID:
        return _error(403, "forbidden", "only the daemon's own user may use this socket")
    try:
        return await handler(request)
    except CorralError as exc:
        return _error(exc.http_status, exc.code, exc.message)
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
    uid = _peer_uid(transport)
    with contextlib.suppress(TypeError):  # a transport that cannot be weakly referenced
        _PEER_UIDS[transport] = uid
    return uid


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


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
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"task {raw!r} does not exist")
    return int(raw)


def _int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value


async def create_task(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if "prompt" not in body:
        raise BadRequest("prompt is required", code="missing_prompt")
    try:
        spec = TaskCreate.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc), code="invalid_task") from None
    task = await request.app[POOL_KEY].submit(
        spec.prompt, agent=spec.agent, model=spec.model, workdir=spec.workdir,
        priority=spec.priority, max_retries=spec.max_retries, timeout_s=spec.timeout_s,
    )
    return web.json_response(task.to_dict(), status=201)


async def list_tasks(request: web.Request) -> web.Response:
    raw_state = request.query.get("state")
    state = None
    if raw_state:
        try:
            state = TaskState(raw_state)
        except ValueError:
            names = ", ".join(s.value for s in TaskState)
            raise BadRequest(f"unknown state {raw_state!r}; states: {names}") from None
    limit = _int_query(request, "limit", 50, 1, 10_000)
    tasks = await request.app[STORE_KEY].list_tasks(state=state, limit=limit)
    return web.json_response({"tasks": [t.to_dict() for t in tasks]})


async def show_task(request: web.Request) -> web.Response:
    task = await request.app[STORE_KEY].get_task(_task_id(request), with_executions=True)
    return web.json_response(task.to_dict())


async def wait_task(request: web.Request) -> web.Response:
    timeout_s = _int_query(request, "timeout_s", 30, 0, int(MAX_WAIT_S))
    await request.app[POOL_KEY].wait_final(_task_id(request), float(timeout_s))
    task = await request.app[STORE_KEY].get_task(_task_id(request), with_executions=True)
    return web.json_response(task.to_dict())


async def cancel_task(request: web.Request) -> web.Response:
    task = await request.app[POOL_KEY].cancel(_task_id(request))
    return web.json_response(task.to_dict())


async def retry_task(request: web.Request) -> web.Response:
    task = await request.app[POOL_KEY].retry(_task_id(request))
    return web.json_response(task.to_dict())


async def task_log(request: web.Request) -> web.StreamResponse:
    """The envelope of a task's execution (the latest by default), optionally followed live."""
    store = request.app[STORE_KEY]
    task_id = _task_id(request)
    follow = request.query.get("follow") in ("1", "true", "yes")
    executions = await store.executions_for(task_id)
    while not executions:
        task = await store.get_task(task_id)  # 404 for a task that does not exist
        if not follow or task.state.final:
            raise NotFound(f"task {task_id} has no execution yet")
        await asyncio.sleep(FOLLOW_POLL_S)  # following a queued task: wait for it to start
        executions = await store.executions_for(task_id)
    wanted = _int_query(request, "execution", executions[-1].id, 1, 2**62)
    matching = [e for e in executions if e.id == wanted]
    if not matching:
        raise NotFound(f"execution {wanted} does not belong to task {task_id}")
    execution = matching[0]
    stream_name = STDERR_LOG if request.query.get("stream") == "stderr" else STDOUT_LOG
    path = Path(execution.log_path or "") / stream_name
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    offset = 0
    while True:
        offset = await _send_from(response, path, offset)
        if not follow:
            break
        execution = await store.get_execution(execution.id)
        if execution.status != ExecStatus.RUNNING:
            await _send_from(response, path, offset)
            break
        await asyncio.sleep(FOLLOW_POLL_S)
    await response.write_eof()
    return response


async def _send_from(response: web.StreamResponse, path: Path, offset: int) -> int:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(256 * 1024):
                await response.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return offset


async def agents(request: web.Request) -> web.Response:
    return web.json_response({"agents": request.app[POOL_KEY].agents_state()})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE_KEY].stats())


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    return web.json_response({"status": "ok" if pool.accepting else "stopping", "pid": os.getpid()})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec())


def build_app(pool: Pool, store: Store, *, max_request_bytes: int) -> web.Application:
    app = web.Application(
        client_max_size=max_request_bytes, middlewares=[api_middleware]
    )
    app[POOL_KEY] = pool
    app[STORE_KEY] = store
    app.router.add_post("/tasks", create_task)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_get("/tasks/{task_id}", show_task)
    app.router.add_get("/tasks/{task_id}/wait", wait_task)
    app.router.add_post("/tasks/{task_id}/cancel", cancel_task)
    app.router.add_post("/tasks/{task_id}/retry", retry_task)
    app.router.add_get("/tasks/{task_id}/log", task_log)
    app.router.add_get("/agents", agents)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi)
    return app
