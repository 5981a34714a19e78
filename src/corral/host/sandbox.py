"""Confining the local agent's shell commands to its workspace (Linux: bubblewrap).

Inside the sandbox the whole filesystem is read-only but for the workspace, ``/tmp`` is private
and empty, there is no network (only an empty loopback) and no view of other processes. Where
unprivileged user namespaces are off, ``bwrap`` fails at start: :func:`probe` finds that out
once and says why. Another system needs its own version of this file (macOS: ``sandbox-exec``).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

BINARY = "bwrap"


def find() -> str | None:
    """The bubblewrap binary, if installed."""
    return shutil.which(BINARY)


async def probe(binary: str) -> str | None:
    """None when bubblewrap works here; else why it does not, in its own words."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *wrap(["true"], Path("/"), binary, bind_workspace=False),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError) as exc:
        return f"{binary} cannot run: {exc}"
    if proc.returncode != 0:
        return f"{binary} fails here: {err.decode('utf-8', 'replace').strip() or proc.returncode}"
    return None


def wrap(argv: list[str], workspace: Path, binary: str, *,
         bind_workspace: bool = True) -> list[str]:
    """``argv`` run inside bubblewrap, with ``workspace`` the one writable path."""
    outer = [binary, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--tmpfs", "/tmp",  # noqa: S108 - a private, empty /tmp inside the sandbox
             "--unshare-net", "--unshare-pid", "--die-with-parent",
             "--new-session"]
    if bind_workspace:
        outer += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace)]
    return [*outer, "--", *argv]
