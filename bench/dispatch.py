"""End-to-end dispatch: tasks/s and submit latency of corral vs huey's SqliteHuey consumer.

corral: N tasks submitted over the socket by C concurrent clients, each run by LocalRunner
against a loopback OpenAI-compatible server that answers at once, until all are recorded as
succeeded. huey: the same work per task (one HTTP call to the same server, the reply written to
a file) through SqliteHuey with thread workers, SQLite at the same synchronous=NORMAL. Then the
daemon's RSS with 200 LocalRunner streams in flight at once.

    .venv/bin/python -m bench.dispatch [--tasks 5000] [--clients 50]

Needs the bench extra (``pip install -e '.[bench]'``). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.loopback import start_server

# How often both sides are checked for completion: the same for corral and huey, and rare
# enough that the check itself costs neither much.
POLL_S = 0.1


def _config(tmp: Path, endpoint: str, model: str, workers: int) -> tuple[Path, Path]:
    sock = Path(tempfile.mkdtemp(prefix="corral-b")) / "corral.sock"
    config = tmp / "config.toml"
    config.write_text(
        f'[daemon]\nsocket_path = "{sock}"\ndata_dir = "{tmp / "data"}"\nlog_level = "WARNING"\n'
        f'sqlite_synchronous = "NORMAL"\n[pool]\nmax_workers = {workers}\n'
        f"[pool.max_concurrent]\nlocal = {workers}\n"
        f'[local_model]\nendpoint = "{endpoint}"\nmodel = "{model}"\n'
        "[claude]\nenabled = false\n[gemini]\nenabled = false\n"
    )
    return config, sock


async def _start_daemon(config: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", "--config", str(config)])
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("daemon did not start")
        await asyncio.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


async def _succeeded(session: aiohttp.ClientSession) -> int:
    async with session.get("http://corral/stats") as resp:
        return int((await resp.json())["tasks"]["succeeded"])


async def bench_corral(
    endpoint: str, tasks: int, clients: int, workers: int = 16
) -> tuple[float, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    config, sock = _config(tmp, endpoint, "bench", workers)
    daemon = await _start_daemon(config, sock)
    latencies: list[float] = []
    try:
        connector = aiohttp.UnixConnector(path=str(sock), limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            queue = iter(range(tasks))

            async def connect() -> None:
                async with session.get("http://corral/health") as resp:
                    await resp.read()

            # Connections are opened before timing starts, as wrk and ab do: the numbers are
            # steady-state submits, not 50 connection handshakes.
            await asyncio.gather(*(connect() for _ in range(clients)))

            async def client() -> None:
                for n in queue:
                    started = time.perf_counter()
                    async with session.post("http://corral/tasks", json={
                            "prompt": f"task {n}", "agent": "local"}) as resp:
                        assert resp.status == 201, await resp.text()
                        await resp.read()
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            while await _succeeded(session) < tasks:
                await asyncio.sleep(POLL_S)
            elapsed = time.perf_counter() - started
    finally:
        _stop(daemon)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return tasks / elapsed, latencies


def bench_huey(endpoint: str, tasks: int, workers: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="huey-bench-"))
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "BENCH_HUEY_DB": str(tmp / "huey.db")}
    os.environ["BENCH_HUEY_DB"] = env["BENCH_HUEY_DB"]
    from bench import huey_tasks

    consumer = subprocess.Popen(
        [sys.executable, "-c",
         f"from bench.huey_tasks import run_consumer; run_consumer({workers})"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        for n in range(tasks):
            huey_tasks.call_model(endpoint, str(out), n)
        while len(os.listdir(out)) < tasks:
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
    finally:
        consumer.send_signal(signal.SIGINT)
        consumer.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return tasks / elapsed


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def bench_memory(endpoint: str, streams: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="corral-mem-"))
    config, sock = _config(tmp, endpoint, "slow", streams)
    daemon = await _start_daemon(config, sock)
    try:
        connector = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(streams):
                async with session.post("http://corral/tasks",
                                        json={"prompt": f"s{n}", "agent": "local"}) as resp:
                    assert resp.status == 201
            peak = 0.0
            while True:
                async with session.get("http://corral/agents") as resp:
                    agents = {a["name"]: a for a in (await resp.json())["agents"]}
                peak = max(peak, _rss_mb(daemon.pid))
                if agents["local"]["running"] >= streams:
                    peak = max(peak, _rss_mb(daemon.pid))
                    break
                await asyncio.sleep(0.02)
            while await _succeeded(session) < streams:
                await asyncio.sleep(0.1)
    finally:
        _stop(daemon)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return peak


async def main(tasks: int, clients: int) -> None:
    server, endpoint = start_server()
    try:
        corral_rate, latencies = await bench_corral(endpoint, tasks, clients)
        huey_rate = bench_huey(endpoint, tasks, workers=8)
        rss = await bench_memory(endpoint, 200)
    finally:
        server.terminate()
        server.join()
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"{tasks} tasks, {clients} concurrent submitters, SQLite synchronous=NORMAL (WAL)")
    print(f"  corral  {corral_rate:>8,.0f} tasks/s end to end (16 local workers); submit p50"
          f" {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"  huey    {huey_rate:>8,.0f} tasks/s (SqliteHuey, 8 thread workers)")
    print(f"  ratio corral / huey: {corral_rate / huey_rate:.2f}x")
    print(f"  corral daemon RSS with 200 local streams in flight: {rss:.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(main(args.tasks, args.clients))
