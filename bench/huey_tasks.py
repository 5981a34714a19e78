"""The huey side of bench/dispatch.py: the same work per task as corral does for a local task.

One HTTP call to the loopback server, the reply written to a file. SQLite runs at
``synchronous=NORMAL`` in WAL mode, as corral's store does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.request
from pathlib import Path

from huey import Huey
from huey.storage import SqliteStorage


class NormalSyncStorage(SqliteStorage):  # type: ignore[misc]
    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


huey = Huey("bench", storage_class=NormalSyncStorage,
            filename=os.environ.get("BENCH_HUEY_DB", "/tmp/bench-huey.db"), results=False)


@huey.task()  # type: ignore[misc]
def call_model(endpoint: str, out_dir: str, n: int) -> None:
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": f"task {n}"}],
                       "stream": False}).encode()
    request = urllib.request.Request(f"{endpoint}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        reply = json.loads(resp.read())["choices"][0]["message"]["content"]
    Path(out_dir, f"{n}.txt").write_text(reply)


def use_db(filename: str) -> None:
    """Point this process's huey at another database (each round of the benchmark has one)."""
    huey.storage_kwargs["filename"] = filename
    huey.storage = huey.create_storage()


def run_consumer(workers: int) -> None:
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=False,
                                    initial_delay=0.001, backoff=1.0, max_delay=0.01,
                                    check_worker_health=False)
    consumer.run()
