"""Running git: no shell, no prompts, C locale, output read whole, git's own words kept for errors.

Every git corral runs goes through :func:`git`. It never asks for credentials, never opens an
editor or pager, never reads the user's hooks for commits it makes itself (``--no-verify`` is the
caller's), and reports failure as :class:`GitError` carrying git's exit code and message.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

# Commits corral makes carry this identity; the user's own config is not needed to run a task.
CORRAL_IDENTITY = ("corral", "corral@localhost")
_ENV = {
    "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GIT_PAGER": "cat",
    "GIT_AUTHOR_NAME": CORRAL_IDENTITY[0], "GIT_AUTHOR_EMAIL": CORRAL_IDENTITY[1],
    "GIT_COMMITTER_NAME": CORRAL_IDENTITY[0], "GIT_COMMITTER_EMAIL": CORRAL_IDENTITY[1],
}


class GitError(CorralError):
    """git failed; ``message`` is git's own, ``exit_code`` its status."""

    code = "git_error"
    http_status = 409

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class GitResult:
    code: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.code == 0


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(_ENV)
    env.update(extra or {})
    return env


async def run_git(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> GitResult:
    """``git -C cwd ARGS``; never raises for git's own failure (see :func:`git`)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", *args,
            cwd=cwd, env=_env(env),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise GitError(f"git is not installed or {cwd} does not exist: {exc}") from None
    except NotADirectoryError:
        raise GitError(f"{cwd} is not a directory") from None
    try:
        out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:  # cancelled: git must not go on changing things alone
            proc.kill()
            await proc.wait()
    return GitResult(proc.returncode or 0, out.decode("utf-8", "replace"),
                     err.decode("utf-8", "replace"))


async def git(cwd: Path, *args: str, env: Mapping[str, str] | None = None,
              stdin: bytes | None = None) -> str:
    """``git -C cwd ARGS``'s output; :class:`GitError` with git's message when it fails."""
    result = await run_git(cwd, *args, env=env, stdin=stdin)
    if not result.ok:
        detail = (result.err.strip() or result.out.strip() or f"exit code {result.code}")
        raise GitError(f"git {' '.join(args[:2])}: {detail}", exit_code=result.code)
    return result.out
