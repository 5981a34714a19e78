"""``corral``: run the daemon (``serve``) or talk to it (every other command).

Client commands import only the standard library and ``corral.server.client``: they answer fast.
Exit codes: 0 ok, 1 the task or request failed, 2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral import __version__
from corral.paths import client_socket_path
from corral.render import render_log, task_detail, task_table, workspace_table
from corral.server.client import ApiError, CorralClient, DaemonUnreachable

if TYPE_CHECKING:  # the client commands never load pydantic
    import asyncio
    from collections.abc import Callable

    from corral.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
FINAL_STATES = ("succeeded", "failed", "cancelled")
STATES = ("blocked", "queued", "running", *FINAL_STATES)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _settings(args: argparse.Namespace) -> Settings | None:
    """The daemon's settings, or None after printing the one-line reason they are invalid."""
    from corral.config import load_settings
    from corral.errors import ConfigError

    try:
        return load_settings(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from corral.daemon import serve
    from corral.errors import ConfigError, StoreUnavailable

    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    logging.basicConfig(level=settings.daemon.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.daemon.event_loop)) as runner:
            return runner.run(serve(settings))
    except ConfigError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except StoreUnavailable as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return 1


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked or, for "auto", when installed; None means asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("corral: event_loop is uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_USAGE
    _print_json(settings.redacted())
    return EXIT_OK


def _client(args: argparse.Namespace) -> CorralClient:
    return CorralClient(str(client_socket_path(args.socket, args.config)))


def _read_prompt(value: str) -> str:
    if value != "-":
        return value
    data = sys.stdin.buffer.read()
    return data.decode("utf-8", "replace")


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The submit options given, as the API's task fields (shared by submit and schedule)."""
    chosen = {
        "agent": args.agent or None, "model": args.model or None,
        "workdir": str(Path(args.dir).resolve()) if args.dir else None,
        "timeout_s": args.timeout, "max_retries": args.retries,
        "isolate": False if args.no_isolate else None, "base": args.base or None,
        "after": [n for group in getattr(args, "after", None) or () for n in group] or None,
        "max_cost_usd": args.max_cost_usd, "node": args.node or None,
    }
    return {"priority": args.priority, **{k: v for k, v in chosen.items() if v is not None}}


def cmd_submit(args: argparse.Namespace) -> int:
    body = {"prompt": _read_prompt(args.prompt), **_task_options(args)}
    client = _client(args)
    task = client.request("POST", "/tasks", body)
    if args.wait:
        task = _wait(client, int(task["id"]))
    if args.json:
        _print_json(task)
    elif args.wait:
        print(task_detail(task))
    else:
        print(f"task {task['id']} {task['state']}")
    if args.wait and task["state"] != "succeeded":
        return EXIT_FAILED
    return EXIT_OK


def _wait(client: CorralClient, task_id: int) -> Any:
    while True:
        task = client.request("GET", f"/tasks/{task_id}/wait", query={"timeout_s": 30})
        if task["state"] in FINAL_STATES:
            return task


def cmd_ls(args: argparse.Namespace) -> int:
    query = {"state": args.state, "agent": args.agent, "since": args.since, "until": args.until,
             "before": args.before, "limit": args.limit}
    data = _client(args).request("GET", "/tasks", query=query)
    if args.json:
        _print_json(data["tasks"])
    else:
        print(task_table(data["tasks"]))
    if data.get("next"):  # on stderr, so a script's --json output stays one document
        print(f"more: corral ls --before {data['next']} (with the same filters)", file=sys.stderr)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    task = _client(args).request("GET", f"/tasks/{args.id}")
    if args.json:
        _print_json(task)
    else:
        print(task_detail(task))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    query = {"follow": "1" if args.follow else None, "execution": args.execution,
             "stream": "stderr" if args.stderr else None}
    lines = _client(args).stream(f"/tasks/{args.id}/log", query=query)
    if args.raw or args.stderr:
        for line in lines:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
    else:
        render_log(lines, sys.stdout)
    return EXIT_OK


def _task_action(args: argparse.Namespace, action: str) -> int:
    task = _client(args).request("POST", f"/tasks/{args.id}/{action}")
    if args.json:
        _print_json(task)
    else:
        print(f"task {task['id']} {task['state']}")
        if task.get("note"):
            print(f"note: {task['note']}")
    return EXIT_OK


def cmd_reply(args: argparse.Namespace) -> int:
    client = _client(args)
    task = client.request("POST", f"/tasks/{args.id}/reply", {"prompt": _read_prompt(args.prompt)})
    if args.wait:
        task = _wait(client, int(task["id"]))
    if args.json:
        _print_json(task)
    elif args.wait:
        print(task_detail(task))
    else:
        print(f"task {task['id']} {task['state']}")
    return EXIT_FAILED if args.wait and task["state"] != "succeeded" else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    query = {"stat": "1" if args.stat else None}
    for chunk in _client(args).stream(f"/tasks/{args.id}/diff", query=query):
        sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    return EXIT_OK


def cmd_merge(args: argparse.Namespace) -> int:
    done = _client(args).request("POST", f"/tasks/{args.id}/merge", {"squash": args.squash})
    if args.json:
        _print_json(done)
    else:
        kept = "deleted" if done["branch_deleted"] else "kept"
        print(f"task {done['task_id']}: merged {done['branch']} as {done['merged'][:12]}"
              f" (branch {kept})")
    return EXIT_OK


def cmd_discard(args: argparse.Namespace) -> int:
    done = _client(args).request("POST", f"/tasks/{args.id}/discard")
    if args.json:
        _print_json(done)
    else:
        print(f"task {done['task_id']}: discarded {done['discarded']}")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    body = {"older_than_days": args.older_than, "dry_run": args.dry_run}
    done = _client(args).request("POST", "/prune", body={k: v for k, v in body.items() if v})
    if args.json:
        _print_json(done)
    else:
        verb = "would remove" if done["dry_run"] else "removed"
        print(f"{verb} {done['tasks']} tasks and {done['executions']} executions finished over"
              f" {done['older_than_days']:g} days ago")
    return EXIT_OK


def cmd_ui(args: argparse.Namespace) -> int:
    status = _client(args).request("GET", "/ui")
    if not status.get("url"):
        print(f"corral: the dashboard is not serving: {status.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        _print_json({"url": status["url"]})
    else:
        print(status["url"])
    if args.open:
        import webbrowser

        webbrowser.open(status["url"])
    return EXIT_OK


def cmd_mcp(args: argparse.Namespace) -> int:
    import asyncio

    from corral.mcp import serve_stdio  # the SDK loads only for this command

    asyncio.run(serve_stdio(str(client_socket_path(args.socket, args.config))))
    return EXIT_OK


def cmd_workspaces(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/workspaces")
    if args.json:
        _print_json(data["workspaces"])
    else:
        print(workspace_table(data["workspaces"]))
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.schedule_command == "add":
        body = {"cron": args.cron, "prompt": _read_prompt(args.prompt), **_task_options(args)}
        schedule = client.request("POST", "/schedules", body)
        if args.json:
            _print_json(schedule)
        else:
            print(f"schedule {schedule['id']}: next firing {_when(schedule['next_at'])}")
        return EXIT_OK
    if args.schedule_command == "rm":
        client.request("DELETE", f"/schedules/{args.id}")
        print(f"schedule {args.id} removed")
        return EXIT_OK
    schedules = client.request("GET", "/schedules")["schedules"]
    if args.json:
        _print_json(schedules)
    elif not schedules:
        print("no schedules")
    for s in [] if args.json else schedules:
        last = f", last task {s['last_task_id']}" if s.get("last_task_id") else ""
        print(f"{s['id']:>4}  {s['cron']:<16} next {_when(s['next_at'])}{last}  {s['prompt'][:60]}")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _task_action(args, "cancel")


def cmd_retry(args: argparse.Namespace) -> int:
    return _task_action(args, "retry")


def cmd_agents(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/agents")
    if args.json:
        _print_json(data["agents"])
        return EXIT_OK
    now = time.time()
    for a in data["agents"]:
        if not a["registered"]:
            print(f"{a['name']:<7} unavailable   {a['reason']}")
            continue
        line = f"{a['name']:<7} {a['state']:<13} {a['running']}/{a['max_concurrent']} running"
        if a.get("daily_cap_usd") is not None or a.get("monthly_cap_usd") is not None:
            line += (f"; spent ${a['spend_today_usd']:.2f} today (cap {a['daily_cap_usd']}),"
                     f" ${a['spend_month_usd']:.2f} this month (cap {a['monthly_cap_usd']})")
        if a.get("paused_until"):
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(a["paused_until"]))
            line += f"; paused until {until}: {a['paused_because']}"
        if a.get("sandbox"):
            line += f"; agent mode {a['agent_mode']}, actions {a['actions']},"
            line += f" sandbox {a['sandbox']}"
        if a.get("cooldown_until"):
            until = time.strftime("%H:%M:%S", time.localtime(a["cooldown_until"]))
            line += f", cooling down until {until} ({a['cooldown_until'] - now:.0f}s)"
        print(line)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/nodes")
    if args.json:
        _print_json(data)
        return EXIT_OK
    now = time.time()
    for n in data["nodes"]:
        beat = ("" if n["heartbeat_at"] is None
                else f", heartbeat {max(now - n['heartbeat_at'], 0):.0f}s ago")
        agents = "" if n["agents"] is None else f", agents {', '.join(n['agents']) or 'none'}"
        mark = " (this one)" if n["node_id"] == data["this"] else ""
        print(f"{n['node_id']}{mark}: {n['host']} pid {n['pid']}{beat}{agents}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    data = _client(args).request("GET", "/stats", query={"by": args.by, "since": args.since})
    if args.json:
        _print_json(data)
        return EXIT_OK
    if args.by:
        for g in data["groups"]:
            print(f"{g[args.by] or '-':<20} {g['executions']:>6} runs  ${g['cost_usd']:>10.4f}"
                  f"{_estimated(g)}  {g['tokens_in']:>10} in / {g['tokens_out']} out tokens")
        return EXIT_OK
    print("tasks: " + ", ".join(f"{k} {v}" for k, v in data["tasks"].items()))
    for name, a in data["agents"].items():
        print(f"{name:<7} {a['executions']} runs ({a['succeeded']} ok, {a['failed']} failed,"
              f" {a['rate_limited']} rate limited), ${a['cost_usd']:.4f}{_estimated(a)},"
              f" {a['tokens_in']} in / {a['tokens_out']} out tokens")
    return EXIT_OK


def _estimated(row: dict[str, Any]) -> str:
    """How much of a cost corral estimated from [prices] (the agent reported none)."""
    estimated = row.get("cost_estimated_usd") or 0
    return f" (${estimated:.4f} estimated)" if estimated else ""


def _task_ids(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a task id or a list of them") from None


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="daemon socket (default: $CORRAL_SOCKET or config)")
    common.add_argument("--config", help="config file (default: $XDG_CONFIG_HOME/corral/...)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    task_options = argparse.ArgumentParser(add_help=False)
    task_options.add_argument("--agent", help="claude, gemini, codex, local, an [agents] one, auto")
    task_options.add_argument("--model")
    task_options.add_argument("--dir", help="working directory for the agent")
    task_options.add_argument("--priority", type=int, default=0)
    task_options.add_argument("--timeout", type=_positive_float, help="seconds")
    task_options.add_argument("--retries", type=int)
    task_options.add_argument("--no-isolate", action="store_true",
                              help="run in --dir itself, not in a worktree of its own")
    task_options.add_argument("--base", help="the commit or branch the worktree starts from")
    task_options.add_argument("--max-cost-usd", type=_positive_float,
                              help="stop the run past this cost")
    task_options.add_argument("--node", help="the node that may run it, or any (a shared"
                              " queue; default: this one when --dir is given)")
    parser = argparse.ArgumentParser(prog="corral", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    sub.add_parser("config", parents=[common], help="print the effective config (redacted)")
    p = sub.add_parser("submit", parents=[common, task_options], help="queue a task")
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    p.add_argument("--after", action="append", type=_task_ids, metavar="ID[,ID…]",
                   help="run only once these tasks have succeeded (repeatable)")
    p.add_argument("--wait", action="store_true", help="block until the task is final")
    p = sub.add_parser("schedule", parents=[common], help="cron schedules that submit tasks")
    schedules = p.add_subparsers(dest="schedule_command", required=True)
    p = schedules.add_parser("add", parents=[common, task_options],
                             help="a schedule: CRON and the prompt each firing submits")
    p.add_argument("cron", help='five fields, e.g. "0 9 * * 1-5"')
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    schedules.add_parser("ls", parents=[common], help="the schedules")
    p = schedules.add_parser("rm", parents=[common], help="remove a schedule")
    p.add_argument("id", type=int)
    p = sub.add_parser("ls", parents=[common], help="list tasks, newest first")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--agent")
    p.add_argument("--since", help="created at or after: a date or time, e.g. 2026-11-01")
    p.add_argument("--until", help="created before: a date or time")
    p.add_argument("--before", type=int, metavar="ID", help="the page after task ID")
    p.add_argument("--limit", type=int, default=50)
    for name, text in (("show", "a task and its executions"), ("cancel", "cancel a task"),
                       ("retry", "queue a finished task again")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("id", type=int)
    p = sub.add_parser("logs", parents=[common], help="an execution's log")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--raw", action="store_true", help="print the stream-json lines")
    p.add_argument("--stderr", action="store_true", help="print stderr.log instead")
    p.add_argument("--execution", type=int, help="a specific execution (default: the latest)")
    p = sub.add_parser("reply", parents=[common],
                       help="a follow-up in the same conversation and workspace")
    p.add_argument("id", type=int)
    p.add_argument("prompt", help="the follow-up, or - to read it from stdin")
    p.add_argument("--wait", action="store_true", help="block until the task is final")
    p = sub.add_parser("diff", parents=[common], help="the task's branch against its base")
    p.add_argument("id", type=int)
    p.add_argument("--stat", action="store_true", help="a diffstat instead of the patch")
    p = sub.add_parser("merge", parents=[common],
                       help="merge the task's branch into your checked-out branch")
    p.add_argument("id", type=int)
    p.add_argument("--squash", action="store_true", help="one commit instead of a merge")
    p = sub.add_parser("discard", parents=[common], help="remove the task's worktree and branch")
    p.add_argument("id", type=int)
    sub.add_parser("workspaces", parents=[common], help="each task's worktree and branch")
    sub.add_parser("agents", parents=[common], help="agents and their state")
    sub.add_parser("nodes", parents=[common], help="the daemons sharing this queue")
    p = sub.add_parser("stats", parents=[common], help="counts, cost and tokens")
    p.add_argument("--by", choices=["day", "agent", "model"], help="per group")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="from this day on (with --by)")
    p = sub.add_parser("ui", parents=[common], help="the dashboard's URL, with its token")
    p.add_argument("--open", action="store_true", help="open it in a browser")
    sub.add_parser("mcp", parents=[common],
                   help="serve the Model Context Protocol on stdio (claude mcp add corral --"
                   " corral mcp)")
    p = sub.add_parser("prune", parents=[common],
                       help="remove old finished tasks with their executions and logs")
    p.add_argument("--older-than", type=_positive_float, metavar="DAYS",
                   help="finished longer ago than this (default: [daemon] keep_days)")
    p.add_argument("--dry-run", action="store_true", help="count them, remove nothing")
    return parser


COMMANDS = {
    "serve": cmd_serve, "config": cmd_config, "submit": cmd_submit, "ls": cmd_ls,
    "show": cmd_show, "logs": cmd_logs, "cancel": cmd_cancel, "retry": cmd_retry,
    "reply": cmd_reply, "diff": cmd_diff, "merge": cmd_merge, "discard": cmd_discard,
    "workspaces": cmd_workspaces, "schedule": cmd_schedule,
    "agents": cmd_agents, "nodes": cmd_nodes, "stats": cmd_stats, "prune": cmd_prune,
    "mcp": cmd_mcp, "ui": cmd_ui,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DaemonUnreachable as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiError as exc:
        print(f"corral: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
