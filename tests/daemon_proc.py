"""The real daemon as a child process, and the real CLI, for tests that need whole processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.conftest import until


class DaemonProcess:
    def __init__(self, config: Path, socket_path: Path, *, log: Path | None = None) -> None:
        """``log``: its stderr goes to this file (a busy daemon would fill a pipe)."""
        self.config = config
        self.socket_path = socket_path
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        if self.log is not None:
            with self.log.open("ab") as err:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "corral.cli", "serve", "--config", str(self.config),
                    stdout=asyncio.subprocess.DEVNULL, stderr=err)
        else:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.cli", "serve", "--config", str(self.config),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)

        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"daemon exited: {await self._stderr()}")
            code, _, _ = await cli("agents", "--json", socket=self.socket_path)
            return code == 0

        await until(ready, timeout_s=30, every_s=0.1)

    async def _stderr(self) -> str:
        assert self.proc is not None
        if self.log is not None:
            await self.proc.wait()
            return self.log.read_text(errors="replace")[-4000:]
        assert self.proc.stderr is not None
        self.stderr += await self.proc.stderr.read()
        return self.stderr.decode()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(self._stderr(), 30)
        return await asyncio.wait_for(self.proc.wait(), 30)


async def cli(*args: str, socket: Path | None = None,
              stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {**os.environ}
    if socket is not None:
        env["CORRAL_SOCKET"] = str(socket)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", *args, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    return proc.returncode or 0, out.decode(), err.decode()


