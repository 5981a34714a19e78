"""A store holding a long history, built with bulk SQL in seconds rather than by submitting.

Every task is finished (mostly succeeded, some failed or cancelled) with one execution, spread
evenly over ``days`` up to ``now``, across the four built-in agents; prompts and summaries are
a few hundred bytes, as real ones are. The schema's triggers count them as the daemon's own
writes are counted, so the store is exactly what a daemon that ran that long would have left.
Used by ``bench.history`` and by the tests of history at scale.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from corral.storage.migrate import migrate_sqlite

AGENTS = ("claude", "gemini", "codex", "local")
MODELS = ("sonnet", "gemini-2.5-pro", "gpt-5.5", "smollm2")

_TASKS = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
INSERT INTO tasks (prompt, requested_agent, agent, model, pinned, classifier_reason, state,
                   attempts, max_retries, created_at, updated_at)
SELECT 'task ' || i || ': ' || :filler,
       CASE i % 4 WHEN 0 THEN 'claude' WHEN 1 THEN 'gemini' WHEN 2 THEN 'codex' ELSE 'local' END,
       CASE i % 4 WHEN 0 THEN 'claude' WHEN 1 THEN 'gemini' WHEN 2 THEN 'codex' ELSE 'local' END,
       CASE i % 4 WHEN 0 THEN 'sonnet' WHEN 1 THEN 'gemini-2.5-pro' WHEN 2 THEN 'gpt-5.5'
                  ELSE 'smollm2' END,
       1, 'requested by the submitter',
       CASE WHEN i % 20 = 0 THEN 'failed' WHEN i % 33 = 0 THEN 'cancelled' ELSE 'succeeded' END,
       1, 0, :start + i * :step, :start + i * :step + 90
FROM n
"""
# Inserted unfinished and then finished, so the usage trigger counts each one as it would.
_EXECUTIONS = """
INSERT INTO executions (task_id, agent, model, status, started_at, prompt, summary, cost_usd,
                        tokens_in, tokens_out, log_dir)
SELECT id, agent, model,
       CASE state WHEN 'succeeded' THEN 'succeeded' WHEN 'failed' THEN 'failed'
                  ELSE 'cancelled' END,
       created_at + 1, NULL, 'summary of task ' || id || ': ' || :filler,
       CASE agent WHEN 'local' THEN 0 ELSE 0.01 + (id % 50) / 1000.0 END,
       1000 + id % 5000, 100 + id % 700, NULL
FROM tasks WHERE id > :first
"""
_FINISH = "UPDATE executions SET finished_at = started_at + 30 + id % 600 WHERE id > :first"


def build(path: Path, tasks: int, *, days: float = 365.0, now: float | None = None) -> None:
    """Add ``tasks`` finished tasks, each with an execution, to the store at ``path``."""
    now = time.time() if now is None else now
    step = days * 86400.0 / max(tasks, 1)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        migrate_sqlite(conn)
        first = conn.execute("SELECT COALESCE(MAX(id), 0) FROM executions").fetchone()[0]
        filler = "lorem ipsum dolor sit amet " * 8  # about 220 bytes
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_TASKS, {"count": tasks, "filler": filler, "start": now - days * 86400.0,
                              "step": step})
        conn.execute(_EXECUTIONS, {"filler": filler, "first": first})
        conn.execute(_FINISH, {"first": first})
        conn.execute("COMMIT")
    finally:
        conn.close()
