"""End-to-end dispatch: tasks/s and submit latency of corral vs huey's SqliteHuey consumer.

corral: N tasks submitted over the socket by C concurrent clients, each run by LocalRunner
against a loopback OpenAI-compatible server that answers at once, until all are recorded as
succeeded. huey: the same work per task (one HTTP call to the same server, the reply written to
a file) through SqliteHuey with thread workers, SQLite at the same synchronous=NORMAL. Then the
daemon's RSS with 200 LocalRunner streams in flight at once.

    .venv/bin/python -m bench.dispatch [--tasks 5000] [--clients 50] [--rounds 3] [--dir D]
                                       [--submitters raw|aiohttp]
    .venv/bin/python -m bench.dispatch --store postgresql://…|temp   (see bench.shared_queue)

Both peers keep their files in the same place (``--dir``, else the temp dir). What creating a
file costs there is printed too: on some disks it dominates both peers' time per task.

The submitters are a load generator, like wrk: each writes its HTTP/1.1 request itself on a
kept-alive connection and reads the reply, so that what is measured is the daemon, not a client
library sharing its two cores. ``--submitters aiohttp`` uses aiohttp's client instead.

Needs the bench extra (``pip install -e '.[bench]'``). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

import aiohttp

from bench.loopback import start_server

# How often both sides are checked for completion: the same for corral and huey, and rare
# enough that the check itself costs neither much.
POLL_S = 0.1
_SOCKET_DIR = tempfile.gettempdir()
# Run through each peer first, untimed, so neither is measured while it warms up (threads and
# connections to start, caches to fill).
WARMUP_TASKS = 200
# Each at its best on this 2-core machine: huey ran 2, 4, 8 and 16 thread workers at about
# 1,760, 1,890, 1,750 and 1,820 tasks/s; 4 was best by a little.
HUEY_WORKERS = 4
# 8, 16 and 32 ran about 2,600, 3,200 and 3,400 tasks/s with submit p99 8, 9.5 and 11 ms: more
# tasks in flight take loop time from submits. 16 balances the two.
CORRAL_WORKERS = 16


def _config(tmp: Path, endpoint: str, model: str, workers: int) -> tuple[Path, Path]:
    # Sockets stay in the system temp dir: a socket path must be short.
    sock = Path(tempfile.mkdtemp(prefix="corral-b", dir=_SOCKET_DIR)) / "corral.sock"
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
    endpoint: str, tasks: int, clients: int, workers: int = CORRAL_WORKERS,
    submitters: str = "raw",
) -> tuple[float, list[float], float]:
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    config, sock = _config(tmp, endpoint, "bench", workers)
    daemon = await _start_daemon(config, sock)
    latencies: list[float] = []
    try:
        connector = aiohttp.UnixConnector(path=str(sock), limit=clients)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def connect() -> None:
                async with session.get("http://corral/health") as resp:
                    await resp.read()

            # Connections are opened before timing starts, as wrk and ab do: the numbers are
            # steady-state submits, not 50 connection handshakes.
            await asyncio.gather(*(connect() for _ in range(clients)))

            async def client(queue: Iterator[int], timed: list[float]) -> None:
                if submitters == "raw":
                    await _submit_raw(sock, queue, timed)
                    return
                for n in queue:
                    started = time.perf_counter()
                    async with session.post("http://corral/tasks", json={
                            "prompt": f"task {n}", "agent": "local"}) as resp:
                        assert resp.status == 201, await resp.text()
                        await resp.read()
                    timed.append(time.perf_counter() - started)

            async def run(first: int, count: int, timed: list[float]) -> None:
                queue = iter(range(first, first + count))
                await asyncio.gather(*(client(queue, timed) for _ in range(clients)))
                while await _succeeded(session) < first + count:
                    await asyncio.sleep(POLL_S)

            await run(0, WARMUP_TASKS, [])
            started, cpu_before = time.perf_counter(), _cpu_s(daemon.pid)
            await run(WARMUP_TASKS, tasks, latencies)
            elapsed, cpu_used = time.perf_counter() - started, _cpu_s(daemon.pid) - cpu_before
    finally:
        _stop(daemon)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return tasks / elapsed, latencies, cpu_used / tasks


async def _submit_raw(sock: Path, queue: Iterator[int], timed: list[float]) -> None:
    """One submitter speaking HTTP/1.1 itself on a kept-alive connection, as wrk does.

    A load generator should cost little next to what it measures: aiohttp's client spends
    about 90 us of CPU per request, on the same two cores as the daemon, and its own overhead
    lands inside every latency it reports.
    """
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        for n in queue:
            body = json.dumps({"prompt": f"task {n}", "agent": "local"}).encode()
            started = time.perf_counter()
            writer.write(b"POST /tasks HTTP/1.1\r\nHost: corral\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"\r\ncontent-length:", 1)[1].split(b"\r\n", 1)[0])
            reply = await reader.readexactly(length)
            timed.append(time.perf_counter() - started)
            assert head.startswith(b"HTTP/1.1 201 "), reply
            assert json.loads(reply)["state"] == "queued", reply
    finally:
        writer.close()
        await writer.wait_closed()


def bench_huey(endpoint: str, tasks: int, workers: int) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="huey-bench-"))
    out = tmp / "out"
    out.mkdir()
    env = {**os.environ, "BENCH_HUEY_DB": str(tmp / "huey.db")}
    from bench import huey_tasks

    huey_tasks.use_db(env["BENCH_HUEY_DB"])

    consumer = subprocess.Popen(
        [sys.executable, "-c",
         f"from bench.huey_tasks import run_consumer; run_consumer({workers})"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def run(first: int, count: int) -> None:
        for n in range(first, first + count):
            huey_tasks.call_model(endpoint, str(out), n)
        while len(os.listdir(out)) < first + count:
            time.sleep(POLL_S)

    try:
        run(0, WARMUP_TASKS)
        started = time.perf_counter()
        run(WARMUP_TASKS, tasks)
        elapsed = time.perf_counter() - started
    finally:
        consumer.send_signal(signal.SIGINT)
        consumer.wait(30)
    return tasks / elapsed


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # it exited meanwhile
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _cpu_s(pid: int) -> float:
    """CPU seconds the process has used (all its threads, user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    """RSS of the daemon process: what corral costs in memory."""
    return int(_status(pid).get("VmRSS", "0 kB").split()[0]) / 1024


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
        shutil.rmtree(sock.parent, ignore_errors=True)
    return peak


async def _warm_server(endpoint: str, requests: int = 2000, concurrent: int = 16) -> None:
    """Untimed requests to the fresh loopback server, so round 1's first peer meets it warm."""
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    left = iter(range(requests))
    async with aiohttp.ClientSession() as session:
        async def one_client() -> None:
            for _ in left:
                async with session.post(f"{endpoint}/chat/completions", json=body) as resp:
                    await resp.read()

        await asyncio.gather(*(one_client() for _ in range(concurrent)))


def _inode_cost_us(base: Path | None, count: int = 200) -> float:
    """Mean cost of creating one folder or file under ``base``: it varies a lot between disks."""
    probe = Path(tempfile.mkdtemp(prefix="inode-probe-", dir=base))
    try:
        started = time.perf_counter()
        for n in range(count):
            (probe / str(n)).mkdir()
            (probe / str(n) / "f").touch()
        return (time.perf_counter() - started) / (2 * count) * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[max(int(len(sorted_values) * fraction) - 1, 0)]


async def main(
    tasks: int, clients: int, rounds: int, base: Path | None, submitters: str
) -> None:
    # Every round's files stay until the end: deleting thousands of files makes the next
    # round's creations slower on some disks, which would bleed one measurement into the next.
    run_dir = Path(tempfile.mkdtemp(prefix="corral-dispatch-", dir=base))
    tempfile.tempdir = str(run_dir)
    where = run_dir.parent
    print(f"{tasks} tasks (after {WARMUP_TASKS} untimed) x {rounds} rounds, {clients} concurrent"
          f" submitters ({submitters} HTTP), SQLite"
          f" synchronous=NORMAL (WAL), files under {where}"
          f" (creating a file or folder there costs {_inode_cost_us(run_dir):.0f} us)")
    server, endpoint = start_server()
    await _warm_server(endpoint)
    ratios = []
    try:
        for n in range(rounds):
            # Alternate who goes first, so neither always gets the quieter half of a round.
            if n % 2:
                huey_rate = bench_huey(endpoint, tasks, workers=HUEY_WORKERS)
            corral_rate, latencies, cpu_per_task = await bench_corral(
                endpoint, tasks, clients, submitters=submitters)
            if not n % 2:
                huey_rate = bench_huey(endpoint, tasks, workers=HUEY_WORKERS)
            latencies.sort()
            ratios.append(corral_rate / huey_rate)
            print(f"  round {n + 1}: corral {corral_rate:>6,.0f} tasks/s"
                  f" ({CORRAL_WORKERS} local workers),"
                  f" submit p50 {statistics.median(latencies) * 1000:.1f} ms,"
                  f" p99 {_percentile(latencies, 0.99) * 1000:.1f} ms,"
                  f" daemon CPU {cpu_per_task * 1e6:.0f} us/task;"
                  f" huey {huey_rate:>6,.0f} tasks/s (SqliteHuey, {HUEY_WORKERS} thread workers);"
                  f" ratio {ratios[-1]:.2f}x")
        rss = await bench_memory(endpoint, 200)
        inode_after_us = _inode_cost_us(run_dir)
    finally:
        server.terminate()
        server.join()
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"  median ratio corral / huey: {statistics.median(ratios):.2f}x")
    print(f"  corral daemon RSS with 200 local streams in flight: {rss:.0f} MB")
    print(f"  creating a file or folder under {where} cost {inode_after_us:.0f} us at the end")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--submitters", choices=("raw", "aiohttp"), default="raw",
                        help="how the clients speak HTTP: a few lines of their own, as wrk"
                             " does (default), or aiohttp's client, which costs more CPU")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where both peers keep their files (default: the temp dir)")
    parser.add_argument("--store", default=None,
                        help="a PostgreSQL URL (or temp, for a throwaway cluster): 1, 2 and 3"
                             " daemons on one queue beside procrastinate (bench.shared_queue)")
    args = parser.parse_args()
    if args.store:
        from bench import shared_queue

        asyncio.run(shared_queue.main(args.store, args.tasks, args.clients, args.rounds))
    else:
        asyncio.run(main(args.tasks, args.clients, args.rounds, args.dir, args.submitters))
