"""The dashboard: pages rendered on the server, a little JavaScript, live by server-sent events.

It is a thin layer over what the socket API already serves: the API itself is mounted under
``/api/`` (the page's buttons and form call it, with the same checks as the CLI), the pages
read the same store and pool, and the live views wake on the pool's own change feed and log
events, never on a timer. Templates and assets ship inside the package: no CDN, no build step,
nothing fetched from elsewhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, cast

import jinja2
from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from markupsafe import escape

from corral.errors import CorralError, NotFound
from corral.executor.landing import Landing
from corral.executor.logfiles import open_log
from corral.executor.pool import Pool
from corral.executor.runner import STDOUT_LOG
from corral.executor.streamjson import parse_line
from corral.models import AUTO, Execution, Task, TaskState
from corral.storage.base import Store, TaskFilter
from corral.ui.auth import LOOPBACK_HOSTS, Handler, guard, new_token, write_token
from corral.ui.views import bars, log_items

log = logging.getLogger(__name__)

POOL = web.AppKey("ui_pool", Pool)
STORE = web.AppKey("ui_store", Store)
LANDING = web.AppKey("ui_landing", Landing)
TOKEN = web.AppKey("ui_token", str)
TEMPLATES = web.AppKey("ui_templates", jinja2.Environment)
LIST_LIMIT = 200
SPEND_DAYS = 30


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("corral.ui", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["when"] = lambda ts: (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
                                      if ts else "")
    env.filters["money"] = lambda v: "" if v is None else f"${v:.4f}"
    env.filters["duration"] = _duration
    env.globals["static"] = lambda name: f"/static/{name}"
    return env


def _duration(ms: int | None) -> str:
    if ms is None:
        return ""
    seconds = ms / 1000
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _page(request: web.Request, template: str, **context: Any) -> web.Response:
    html = request.app[TEMPLATES].get_template(template).render(
        token=request.app[TOKEN], page=template.removesuffix(".html"), **context)
    return web.Response(text=html, content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self'"
                                 " data:; style-src 'self'; frame-ancestors 'none'",
                                 "Cache-Control": "no-store"})


async def _rows(request: web.Request, tasks: list[Task]) -> list[str]:
    totals = await request.app[STORE].execution_totals([t.id for t in tasks])
    template = request.app[TEMPLATES].get_template("_row.html")
    return [template.render(t=t.to_dict(), sums=totals.get(t.id, {})) for t in tasks]


def _filter(request: web.Request) -> TaskFilter:
    raw = request.query.get("state") or None
    state = TaskState(raw) if raw in {s.value for s in TaskState} else None
    return TaskFilter(state=state, agent=request.query.get("agent") or None)


def _matches(where: TaskFilter, task: Task) -> bool:
    return ((where.state is None or task.state == where.state)
            and (where.agent is None or task.agent == where.agent))


async def tasks_page(request: web.Request) -> web.Response:
    where = _filter(request)
    page = await request.app[STORE].list_tasks(where, limit=LIST_LIMIT)
    return _page(request, "tasks.html", rows=await _rows(request, page.tasks),
                 states=[s.value for s in TaskState], agents=request.app[POOL].known_agents,
                 state=where.state.value if where.state else "", agent=where.agent or "",
                 more=page.next)


async def task_page(request: web.Request) -> web.Response:
    task = await request.app[STORE].get_task(_task_id(request), with_executions=True)
    diff, diff_error = "", None
    if task.workspace is not None:
        try:
            diff = await request.app[LANDING].diff(task.id, stat=False)
        except CorralError as exc:
            diff_error = exc.message
    return _page(request, "task.html", t=task.to_dict(), head=_head(request, task),
                 diff=diff, diff_error=diff_error)


def _head(request: web.Request, task: Task) -> str:
    return request.app[TEMPLATES].get_template("_head.html").render(t=task.to_dict())


async def agents_page(request: web.Request) -> web.Response:
    return _page(request, "agents.html", agents=request.app[POOL].agents_state())


async def spend_page(request: web.Request) -> web.Response:
    store = request.app[STORE]
    since = (dt.date.today() - dt.timedelta(days=SPEND_DAYS - 1)).isoformat()
    days = {g["day"]: g for g in await store.usage("day", since)}
    span = [(dt.date.today() - dt.timedelta(days=n)).isoformat()
            for n in range(SPEND_DAYS - 1, -1, -1)]
    by_day = [(day, float(days.get(day, {}).get("cost_usd", 0.0))) for day in span]
    tokens = [(day, float(days.get(day, {}).get("tokens_in", 0)
                          + days.get(day, {}).get("tokens_out", 0))) for day in span]
    by_agent = await store.usage("agent", since)
    return _page(request, "spend.html", cost_bars=bars(by_day), token_bars=bars(tokens),
                 by_agent=by_agent, since=since)


async def submit_page(request: web.Request) -> web.Response:
    return _page(request, "submit.html", agents=[AUTO, *request.app[POOL].known_agents])


def _task_id(request: web.Request) -> int:
    raw = request.match_info["task_id"]
    if not (raw.isascii() and raw.isdigit()):
        raise NotFound(f"no task {raw!r}")
    return int(raw)


async def task_events(request: web.Request) -> EventSourceResponse:
    """The tasks table, live: each changed task's row as it changes (an empty row: it left the
    filtered view)."""
    pool, store, where = request.app[POOL], request.app[STORE], _filter(request)
    with pool.task_changes.subscribe() as changes:
        async with sse_response(request) as events:
            await events.send("{}", event="ready")
            while True:
                for task_id in sorted(cast("set[int]", await changes.next())):
                    try:
                        task = await store.get_task(task_id)
                    except NotFound:  # pruned meanwhile
                        continue
                    html = (await _rows(request, [task]))[0] if _matches(where, task) else ""
                    await events.send(json.dumps({"id": task.id, "html": html}), event="task")
    return events


async def log_events(request: web.Request) -> EventSourceResponse:
    """A task's page, live: its header as it changes, and each execution's log as it grows."""
    pool, store, task_id = request.app[POOL], request.app[STORE], _task_id(request)
    await store.get_task(task_id)  # a 404 before the stream starts
    shown: int | None = None
    with pool.watch_task(task_id) as changed:
        async with sse_response(request) as events:
            while True:
                changed.clear()
                task = await store.get_task(task_id, with_executions=True)
                await events.send(json.dumps({"html": _head(request, task)}), event="state")
                for execution in task.executions:
                    if shown is not None and execution.id <= shown:
                        continue
                    await events.send(json.dumps({"id": execution.id}), event="execution")
                    await _follow(pool, execution, events)
                    shown = execution.id
                await changed.wait()  # a new execution (a reply, a retry), or a new state
    return events


async def _follow(pool: Pool, execution: Execution, events: EventSourceResponse) -> None:
    """Send the execution's log as conversation items, following it while it runs."""
    path = Path(execution.log_dir or "") / STDOUT_LOG
    offset = 0
    with pool.watch_execution(execution.id) as grew:
        while True:
            grew.clear()
            running = pool.execution_running(execution.id)
            offset = await _send_lines(path, offset, events)
            if not running:
                return
            await grew.wait()


async def _send_lines(path: Path, offset: int, events: EventSourceResponse) -> int:
    def read() -> bytes:
        try:
            with open_log(path) as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return b""

    data = await asyncio.to_thread(read)
    complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for its end
    for line in complete.splitlines():
        event = parse_line(line)
        if event is None:
            continue
        for item in log_items(event):
            await events.send(json.dumps(item.to_dict()), event="log")
    return offset + len(complete)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A page that fails says why in a page, not a traceback."""
    try:
        return await handler(request)
    except CorralError as exc:
        if request.path.startswith("/api/"):
            raise
        return web.Response(status=exc.http_status, content_type="text/html",
                            text=f"<!doctype html><title>corral</title><p>{_escape(exc.message)}"
                            '</p><p><a href="/">tasks</a></p>')


def _escape(text: str) -> str:
    return str(escape(text))


def build_ui_app(api: web.Application, pool: Pool, store: Store, landing: Landing, token: str,
                 allowed_hosts: Any) -> web.Application:
    """The dashboard around ``api`` (the socket API's application, mounted at ``/api/``)."""
    app = web.Application(middlewares=[guard(token, allowed_hosts), _errors])
    app[POOL], app[STORE], app[LANDING], app[TOKEN] = pool, store, landing, token
    app[TEMPLATES] = _templates()
    app.router.add_get("/", tasks_page)
    app.router.add_get("/tasks/{task_id}", task_page)
    app.router.add_get("/agents", agents_page)
    app.router.add_get("/spend", spend_page)
    app.router.add_get("/submit", submit_page)
    app.router.add_get("/events/tasks", task_events)
    app.router.add_get("/events/tasks/{task_id}", log_events)
    static = resources.files("corral.ui").joinpath("static")
    app.router.add_static("/static/", Path(str(static)), append_version=True)
    app.add_subapp("/api/", api)
    return app


class Dashboard:
    """The dashboard's TCP site, for ``async with``; a port that cannot be had is logged and
    reported by :meth:`status` (``corral ui``), and the daemon goes on without it."""

    def __init__(self, host: str, port: int, token_path: Path) -> None:
        self.host, self.port, self.token_path = host, port, token_path
        self.token = new_token()
        self.bound_port: int | None = None
        self.error: str | None = None
        self._runner: web.AppRunner | None = None

    def allowed_hosts(self) -> set[str]:
        port = self.bound_port or self.port
        names = {self.host, *(LOOPBACK_HOSTS if self.host in LOOPBACK_HOSTS else ())}
        return {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}

    @property
    def url(self) -> str | None:
        if self.bound_port is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.bound_port}/?token={self.token}"

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "url": self.url, "error": self.error}

    async def start(self, api: web.Application, pool: Pool, store: Store,
                    landing: Landing) -> None:
        if self.host not in LOOPBACK_HOSTS:
            log.warning("the dashboard listens on %s, not loopback: whoever reaches it with the"
                        " token can run agents as you", self.host)
        write_token(self.token_path, self.token)
        app = build_ui_app(api, pool, store, landing, self.token, self.allowed_hosts)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            self.error = f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            log.error("the dashboard is off: %s; the socket API serves on", self.error)
            return
        self.bound_port = int(self._runner.addresses[0][1])
        log.info("dashboard on http://%s:%d/ (`corral ui` prints it with the token)",
                 self.host, self.bound_port)

    async def close(self) -> None:
        self.token_path.unlink(missing_ok=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
