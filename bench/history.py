"""A year of history: the daemon on a store of a million finished tasks (and as many executions).

Builds the store with bulk SQL (``bench.bigstore``), then measures, with the daemon serving it:
start until it answers, ``stats``, ``ls --state``, a task, a paged walk of every task, and
submit latency idle vs while two clients hammer ``stats`` and ``ls --state``; then the CLI's
wall time. Peers measured in the same run: the scans ``stats`` ran before its counters (the
same GROUP BY over the same file through ``sqlite3``), the daemon's own idle submit p99, and
the interpreter starting with nothing to do (``python -c pass``) for the CLI. Not a pass/fail
test.

    .venv/bin/python -m bench.history [--tasks 1000000] [--dir D] [--keep]

Needs the bench extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.bigstore import build
from bench.loopback import start_server

# What `corral stats` ran before the counters: every task and execution, grouped.
_OLD_STATS = (
    "SELECT state, COUNT(*) FROM tasks GROUP BY state",
    "SELECT agent, COUNT(*), SUM(status = 'succeeded'), SUM(status = 'failed'),"
    " SUM(status = 'rate_limited'), COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens_in), 0),"
    " COALESCE(SUM(tokens_out), 0), AVG(CASE WHEN finished_at IS NOT NULL THEN"
    " (finished_at - started_at) * 1000 END) FROM executions GROUP BY agent ORDER BY agent",
)


def _config(tmp: Path, data_dir: Path, endpoint: str) -> tuple[Path, Path]:
    sock = Path(tempfile.mkdtemp(prefix="corral-h")) / "corral.sock"  # a socket path is short
    config = tmp / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{data_dir}"\nlog_level = "WARNING"\n'
        f'[local_model]\nendpoint = "{endpoint}"\nmodel = "bench"\n'
        "[claude]\nenabled = false\n[gemini]\nenabled = false\n[codex]\nenabled = false\n")
    return config, sock


async def _answering(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the daemon did not start")
        if sock.exists():
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with (aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as s,
                            s.get("http://corral/agents") as resp):
                    if resp.status == 200:
                        return
        await asyncio.sleep(0.005)


async def _start(config: Path, sock: Path) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--config",
                             str(config)])
    await _answering(sock, proc)
    return proc, time.perf_counter() - started


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms"


async def _timed(call: Callable[[], Awaitable[object]], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        await call()
        out.append(time.perf_counter() - started)
    return out


def _old_stats_s(db: Path, rounds: int = 3) -> float:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for sql in _OLD_STATS:
                conn.execute(sql).fetchall()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _wall_s(argv: list[str], rounds: int = 10) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def _reads(session: aiohttp.ClientSession, some_id: int) -> None:
    async def get(path: str, **params: str) -> None:
        async with session.get(f"http://corral{path}", params=params) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    for label, path, params in (
        ("stats", "/stats", {}), ("stats --by day", "/stats", {"by": "day"}),
        ("ls --limit 20", "/tasks", {"limit": "20"}),
        ("ls --state succeeded --limit 20", "/tasks", {"state": "succeeded", "limit": "20"}),
        ("ls --agent codex --limit 20", "/tasks", {"agent": "codex", "limit": "20"}),
        ("show ID", f"/tasks/{some_id}", {}),
    ):
        timed = await _timed(functools.partial(get, path, **params), 50)
        print(f"  {label:<34} {_ms(timed)}")


async def _walk(session: aiohttp.ClientSession) -> tuple[int, float, list[float]]:
    count, before, pages = 0, None, []
    started = time.perf_counter()
    while True:
        page_started = time.perf_counter()
        params = {"limit": "1000", **({"before": str(before)} if before else {})}
        async with session.get("http://corral/tasks", params=params) as resp:
            data = await resp.json()
        pages.append(time.perf_counter() - page_started)
        count += len(data["tasks"])
        before = data["next"]
        if before is None:
            return count, time.perf_counter() - started, pages


async def _submits(session: aiohttp.ClientSession, count: int) -> list[float]:
    async def submit() -> None:
        async with session.post("http://corral/tasks",
                                json={"prompt": "hello", "agent": "local"}) as resp:
            assert resp.status == 201, await resp.text()

    return await _timed(submit, count)


# A client of its own, as a user's dashboard or script would be: its own process.
_HAMMER = """
import sys
from corral.server.client import CorralClient
client = CorralClient(sys.argv[1])
while True:
    client.request("GET", "/stats")
    client.request("GET", "/tasks", query={"state": "succeeded", "limit": 50})
"""


def _hammers(sock: Path, count: int, nice: int) -> list[subprocess.Popen[bytes]]:
    argv = [*(["nice", "-n", str(nice)] if nice else []), sys.executable, "-c", _HAMMER, str(sock)]
    return [subprocess.Popen(argv) for _ in range(count)]


async def main(tasks: int, base: Path | None, keep: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="corral-history-", dir=base))
    data_dir = tmp / "data"
    data_dir.mkdir()
    db = data_dir / "corral.db"
    server, endpoint = start_server()
    try:
        started = time.perf_counter()
        build(db, tasks)
        print(f"store: {tasks:,} tasks and executions built in"
              f" {time.perf_counter() - started:.1f} s, {db.stat().st_size / 2**20:,.0f} MiB")
        config, sock = _config(tmp, data_dir, endpoint)
        starts = []
        for _ in range(3):
            proc, start_s = await _start(config, sock)
            starts.append(start_s)
            _stop(proc)
        imports_s = _wall_s([sys.executable, "-c", "import corral.daemon"], rounds=3)
        print(f"start until it answers: {', '.join(f'{s:.2f}' for s in starts)} s"
              f" (importing the daemon's modules alone: {imports_s:.2f} s)")
        proc, _ = await _start(config, sock)
        try:
            connector = aiohttp.UnixConnector(str(sock))
            async with aiohttp.ClientSession(connector=connector) as session:
                print("reads in the daemon, 50 each, over the socket:")
                await _reads(session, tasks // 2)
                old_s = _old_stats_s(db)
                print(f"  the scans stats ran before its counters (sqlite3, same file):"
                      f" {old_s * 1000:,.0f} ms")
                count, walk_s, pages = await _walk(session)
                print(f"paged walk of every task ({count:,}, 1,000 a page): {walk_s:.1f} s,"
                      f" page {_ms(pages)}")
                await _submits(session, 50)  # warm
                idle = await _submits(session, 300)
                p99_idle = sorted(idle)[int(len(idle) * 0.99)]
                print(f"submit idle:                                  {_ms(idle)}")
                # On two cores the load generators take CPU from the daemon; niced, they
                # stand for clients on other cores, and what is left is the daemon's own cost.
                for nice, who in ((0, "as busy as the daemon"), (19, "niced")):
                    hammers = _hammers(sock, 2, nice)
                    await asyncio.sleep(1.0)  # until both are at it
                    busy = await _submits(session, 300)
                    for hammer in hammers:
                        hammer.kill()
                        hammer.wait()
                    p99_busy = sorted(busy)[int(len(busy) * 0.99)]
                    print(f"submit, 2 clients hammer stats and ls ({who}): {_ms(busy)}"
                          f"  p99 {p99_busy / p99_idle:.2f}x idle")
            env_socket = ["env", f"CORRAL_SOCKET={sock}"]
            cli = [str(Path(sys.executable).with_name("corral"))]  # the command users run
            bare_s = _wall_s([sys.executable, "-c", "pass"])
            ls_s = _wall_s([*env_socket, *cli, "ls", "--limit", "20"])
            version_s = _wall_s([*cli, "--version"])
            print(f"corral ls --limit 20: {ls_s * 1000:.0f} ms wall; corral --version:"
                  f" {version_s * 1000:.0f} ms; python -c pass: {bare_s * 1000:.0f} ms"
                  f" (ls is {ls_s / bare_s:.1f}x the bare interpreter)")
        finally:
            _stop(proc)
    finally:
        server.terminate()
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, help="where the store goes (default: temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ns = parser.parse_args()
    asyncio.run(main(ns.tasks, ns.dir, ns.keep))
