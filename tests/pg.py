"""A throwaway PostgreSQL cluster for the tests: Debian's server, ``initdb`` and ``pg_ctl`` in a
temporary folder, on a free loopback port, removed afterwards.

As root the server runs as the ``postgres`` user (PostgreSQL refuses root), which owns the
folder; otherwise as the current user. In CI a missing server is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from tests import peers


def bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    folder: Path
    port: int
    bindir: Path
    user: str | None  # run the server's tools as this user (when we are root)
    databases: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://corral@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True,
                              timeout=120)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "corral",
                  "--auth=trust", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        # fsync off: a test cluster never outlives a crash of the machine.
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off"
                   " -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.folder / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                  "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    async def new_database(self) -> str:
        """A fresh, empty database's URL."""
        name = f"t{len(self.databases)}_{os.getpid()}"
        self.databases.append(name)
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    async def role_with_password(self, role: str, password: str) -> None:
        """A role that must give its password over TCP (every other role is trusted)."""
        conn = await asyncpg.connect(self.url())
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        finally:
            await conn.close()
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "reload")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.folder / "server.log").read_text()[-4000:]
        return ""


@contextlib.contextmanager
def cluster() -> Iterator[PgCluster]:
    bindir = bin_dir()
    if bindir is None:
        if peers.in_ci():
            pytest.fail("PostgreSQL's initdb is not installed (scripts/setup.sh --test installs"
                        " it)")
        pytest.skip("PostgreSQL is not installed")
    user = None
    folder = Path(tempfile.mkdtemp(prefix="corral-pg-"))
    if os.geteuid() == 0:
        user = "postgres"
        pw = pwd.getpwnam(user)
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    made = PgCluster(folder, free_port(), bindir, user)
    try:
        made.init()
        made.start()
        yield made
    finally:
        made.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
