"""The procrastinate side of ``bench.dispatch --store``: the same work per task as corral does
for a local task (one call to the loopback server, the reply written to a file), in an async
task, run by procrastinate's worker with the same concurrency as corral's workers.

    BENCH_PG_URL=postgresql://… python -m bench.procrastinate_tasks CONCURRENCY   # one node
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(
    conninfo=os.environ.get("BENCH_PG_URL", "")))
_session: aiohttp.ClientSession | None = None


@app.task(name="call_model")
async def call_model(endpoint: str, out_dir: str, n: int) -> None:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession()
    body = {"model": "bench", "messages": [{"role": "user", "content": f"task {n}"}],
            "stream": False}
    async with _session.post(f"{endpoint}/chat/completions", json=body) as resp:
        reply = (await resp.json())["choices"][0]["message"]["content"]
    await asyncio.to_thread(Path(out_dir, f"{n}.txt").write_text, reply)


async def _worker(concurrency: int) -> None:
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, wait=True, listen_notify=True,
                                   install_signal_handlers=True, delete_jobs="never")


if __name__ == "__main__":
    asyncio.run(_worker(int(sys.argv[1])))
