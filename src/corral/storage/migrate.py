"""Numbered, additive SQL migrations shipped inside the package, applied in order.

Each backend has its own folder of ``NNNN_name.sql`` files under ``corral/storage/sql/``, read
with :mod:`importlib.resources`, so an installed wheel migrates exactly as a checkout does.
Applied versions are recorded in ``schema_migrations``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(backend: str = "sqlite") -> list[Migration]:
    """The backend's migrations in order; a gap in the numbering is an error."""
    folder = resources.files("corral.storage").joinpath("sql", backend)
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name.removesuffix(".sql"),
                                   entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"{backend} migrations must be numbered 0001.. without gaps,"
                           f" found {versions}")
    return found


def migrate_sqlite(conn: sqlite3.Connection, *, upto: int | None = None) -> list[int]:
    """Apply every pending migration (up to ``upto``), each in its own transaction.

    ``conn`` is in autocommit mode (``isolation_level=None``); the caller holds it alone.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    done = {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for migration in load_migrations("sqlite"):
        if migration.version in done or (upto is not None and migration.version > upto):
            continue
        # executescript would commit on its own; statements run in one explicit transaction.
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(migration.version)
    return applied


def statements(sql: str) -> list[str]:
    """A migration's statements: ``--`` comments dropped, split where a statement is complete
    (so a trigger's body, with its own semicolons, stays whole)."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    out: list[str] = []
    pending = ""
    for piece in "\n".join(lines).split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                out.append(pending.strip().removesuffix(";").strip())
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"an incomplete statement at the end of a migration: {pending[:80]!r}")
    return out


# Any constant of our own: every corral daemon migrating one database takes the same lock.
MIGRATION_LOCK = 0x636F7272616C  # "corral"


async def migrate_postgres(conn: Any, *, upto: int | None = None) -> list[int]:
    """Apply every pending PostgreSQL migration, each in its own transaction.

    An advisory lock held meanwhile makes daemons starting together migrate once: the others
    wait, then find nothing left to do. ``conn`` is an ``asyncpg.Connection``.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in load_migrations("postgres"):
            if migration.version in done or (upto is not None and migration.version > upto):
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)  # a script: PostgreSQL splits it itself
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at)"
                    " VALUES ($1, $2, $3)", migration.version, migration.name, time.time())
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
