"""``bench.dispatch --store URL``: one PostgreSQL queue drained by 1, 2 and 3 corral daemons,
beside procrastinate (PyPI) doing the same work with as many worker processes, in one run.

Each peer and node count gets a fresh database on the same server. Tasks are submitted by
concurrent clients (corral: over the daemons' sockets in turn, as raw HTTP/1.1; procrastinate:
``defer_async`` through its own connector), and counted done in the database every
``POLL_S`` for both. Printed: tasks/s, submit p99, and the ratio corral / procrastinate.

    .venv/bin/python -m bench.dispatch --store postgresql://user@127.0.0.1:5432/postgres
    .venv/bin/python -m bench.dispatch --store temp     # a throwaway cluster made here

Not a pass/fail test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench.dispatch import (
    POLL_S,
    WARMUP_TASKS,
    _percentile,
    _submit_raw,
    _warm_server,
)
from bench.loopback import start_server

WORKERS = 16  # per node, both peers (corral's best on one node, see bench.dispatch)
NODE_COUNTS = (1, 2, 3)


@contextlib.contextmanager
def _temp_cluster() -> Iterator[str]:
    from tests import pg  # the tests' throwaway cluster: Debian's initdb and pg_ctl

    with pg.cluster() as made:
        yield made.url()


async def _fresh_database(url: str, name: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql) or 0)
    finally:
        await conn.close()


async def _wait_done(url: str, sql: str, total: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        while int(await conn.fetchval(sql) or 0) < total:
            await asyncio.sleep(POLL_S)
    finally:
        await conn.close()


def _node_config(folder: Path, url: str, endpoint: str, node: str) -> tuple[Path, Path]:
    sock = Path(tempfile.mkdtemp(prefix="corral-q", dir="/tmp")) / "corral.sock"
    folder.mkdir(parents=True)
    config = folder / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{folder / "data"}"\n'
        f'log_level = "WARNING"\nnode_id = "{node}"\n[store]\nurl = "{url}"\n'
        f"[pool]\nmax_workers = {WORKERS}\n[pool.max_concurrent]\nlocal = {WORKERS}\n"
        f'[local_model]\nendpoint = "{endpoint}"\nmodel = "bench"\n'
        "[claude]\nenabled = false\n[gemini]\nenabled = false\n[codex]\nenabled = false\n")
    return config, sock


async def _start_daemons(url: str, endpoint: str, nodes: int,
                         tmp: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    started = []
    for n in range(nodes):
        config, sock = _node_config(tmp / f"node{n}", url, endpoint, f"n{n}")
        proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--config",
                                 str(config)])
        started.append((proc, sock))
    deadline = time.monotonic() + 60
    for proc, sock in started:
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("a daemon did not start")
            await asyncio.sleep(0.05)
    return started


async def bench_corral(url: str, endpoint: str, tasks: int, clients: int,
                       nodes: int) -> tuple[float, list[float]]:
    db = await _fresh_database(url, f"bench_corral_{nodes}")
    tmp = Path(tempfile.mkdtemp(prefix="corral-shared-"))
    daemons = await _start_daemons(db, endpoint, nodes, tmp)
    done_sql = "SELECT SUM(tasks) FROM task_counts WHERE state = 'succeeded'"
    try:
        async def run(first: int, count: int, timed: list[float]) -> None:
            queue = iter(range(first, first + count))
            await asyncio.gather(*(_submit_raw(daemons[c % nodes][1], queue, timed)
                                   for c in range(clients)))
            await _wait_done(db, done_sql, first + count)

        await run(0, WARMUP_TASKS, [])
        latencies: list[float] = []
        started = time.perf_counter()
        await run(WARMUP_TASKS, tasks, latencies)
        elapsed = time.perf_counter() - started
    finally:
        for proc, _ in daemons:
            proc.send_signal(signal.SIGTERM)
        for proc, sock in daemons:
            proc.wait(60)
            shutil.rmtree(sock.parent, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return tasks / elapsed, latencies


async def bench_procrastinate(url: str, endpoint: str, tasks: int, clients: int,
                              nodes: int) -> tuple[float, list[float]]:
    import procrastinate

    db = await _fresh_database(url, f"bench_procrastinate_{nodes}")
    out = Path(tempfile.mkdtemp(prefix="procrastinate-out-"))
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=db, min_size=4, max_size=clients))
    app.add_tasks_from(procrastinate.Blueprint(), namespace="unused")
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        env = {**os.environ, "BENCH_PG_URL": db}
        workers = [subprocess.Popen([sys.executable, "-m", "bench.procrastinate_tasks",
                                     str(WORKERS)], env=env, stderr=subprocess.DEVNULL)
                   for _ in range(nodes)]
        done_sql = "SELECT COUNT(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        defer = app.configure_task("call_model").defer_async
        try:
            async def client(queue: Iterator[int], timed: list[float]) -> None:
                for n in queue:
                    started = time.perf_counter()
                    await defer(endpoint=endpoint, out_dir=str(out), n=n)
                    timed.append(time.perf_counter() - started)

            async def run(first: int, count: int, timed: list[float]) -> None:
                queue = iter(range(first, first + count))
                await asyncio.gather(*(client(queue, timed) for _ in range(clients)))
                await _wait_done(db, done_sql, first + count)

            await run(0, WARMUP_TASKS, [])
            latencies: list[float] = []
            started = time.perf_counter()
            await run(WARMUP_TASKS, tasks, latencies)
            elapsed = time.perf_counter() - started
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGINT)
            for proc in workers:
                proc.wait(60)
            shutil.rmtree(out, ignore_errors=True)
    return tasks / elapsed, latencies


def _ms(latencies: list[float], fraction: float) -> float:
    return _percentile(sorted(latencies), fraction) * 1000


async def main(store: str, tasks: int, clients: int, rounds: int) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(_temp_cluster()) if store == "temp" else store
        print(f"{tasks} tasks (after {WARMUP_TASKS} untimed) x {rounds} rounds per node count,"
              f" {clients} concurrent submitters, {WORKERS} workers per node, PostgreSQL"
              f" {await _count(url, 'SHOW server_version_num')}")
        server, endpoint = start_server()
        await _warm_server(endpoint)
        try:
            for nodes in NODE_COUNTS:
                ratios = []
                for n in range(rounds):
                    first, second = ((bench_corral, bench_procrastinate) if n % 2 == 0
                                     else (bench_procrastinate, bench_corral))
                    results = {}
                    for peer in (first, second):
                        results[peer.__name__] = await peer(url, endpoint, tasks, clients, nodes)
                    c_rate, c_lat = results["bench_corral"]
                    p_rate, p_lat = results["bench_procrastinate"]
                    ratios.append(c_rate / p_rate)
                    print(f"  {nodes} node(s), round {n + 1}: corral {c_rate:>6,.0f} tasks/s,"
                          f" submit p99 {_ms(c_lat, 0.99):.1f} ms; procrastinate"
                          f" {p_rate:>6,.0f} tasks/s, defer p99 {_ms(p_lat, 0.99):.1f} ms;"
                          f" ratio {ratios[-1]:.2f}x")
                print(f"  {nodes} node(s): median ratio corral / procrastinate"
                      f" {statistics.median(ratios):.2f}x")
        finally:
            server.terminate()
            server.join()
