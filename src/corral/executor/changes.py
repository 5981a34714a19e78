"""Measure what a run changed: in a git working dir from the commit at start to the tree at end,
elsewhere from the ``N files changed, …`` line the agent's own answer ends with, if any.

Untracked files count. A throwaway index is used so the user's own index is never touched.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from corral.executor.streamjson import ChangeStat, parse_changestat

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


async def _git(workdir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    full_env = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *args, cwd=workdir, env=full_env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return 127, ""
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode("utf-8", "replace")


async def git_base(workdir: Path | None) -> str | None:
    """The commit a run starts from (the empty tree for a repo with no commits), or None."""
    if workdir is None:
        return None
    code, out = await _git(workdir, "rev-parse", "--is-inside-work-tree")
    if code != 0 or out.strip() != "true":
        return None
    code, out = await _git(workdir, "rev-parse", "--verify", "-q", "HEAD")
    return out.strip() if code == 0 and out.strip() else EMPTY_TREE


async def git_changestat(workdir: Path | None, base: str | None) -> ChangeStat | None:
    """Diff ``base`` against the working tree, untracked files included (None: not a repo)."""
    if workdir is None or base is None:
        return None
    code, top = await _git(workdir, "rev-parse", "--show-toplevel")
    if code != 0:
        return None
    with tempfile.TemporaryDirectory(prefix="corral-idx-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        code, _ = await _git(Path(top.strip()), "add", "-A", ".", env=env)
        if code != 0:
            return None
        code, out = await _git(
            Path(top.strip()), "diff", "--cached", "--shortstat", base, env=env
        )
    if code != 0:
        return None
    return parse_changestat(out) or ChangeStat(0, 0, 0)


async def measure_changes(
    workdir: Path | None, base: str | None, final_text: str | None
) -> ChangeStat | None:
    """git's measurement where the working dir is a repository, else the agent's own words."""
    if workdir is not None and base is not None:
        return await git_changestat(workdir, base)
    return parse_changestat(final_text) if final_text else None
