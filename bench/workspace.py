"""Making a task's workspace vs ``git worktree add`` alone, on a repository of 20,000 files.

corral's side is everything a task's workspace costs before its agent starts: finding the
repository and the base commit (at submit), then ``Workspaces.ensure`` (the worktree, its
branch, the copy of untracked files, the submodule check). git's side is ``git worktree add -b``
of the same commit. Both run in the same process, alternating, on the same repository; the disk
each worktree adds (its files plus git's admin folder for it, the index among them) is printed
beside the times. Not a pass/fail test.

    .venv/bin/python -m bench.workspace [--files 20000] [--rounds 5] [--dir D]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from corral.workspace.manager import Workspaces, find_repository

_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b", "LC_ALL": "C"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=_ENV, check=True,
                          capture_output=True, text=True).stdout


def make_repo(path: Path, files: int) -> None:
    """``files`` small source files in a tree 100 folders wide, one commit."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for n in range(files):
        folder = path / "src" / f"pkg{n % 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{n}.py").write_text(f"VALUE_{n} = {n}\n\ndef f{n}():\n    return {n}\n")
    (path / ".gitignore").write_text(".env\n")
    (path / ".env").write_text("TOKEN=bench\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "generated")


def disk_bytes(*paths: Path) -> int:
    total = 0
    for root in paths:
        for folder, _dirs, names in os.walk(root):
            for name in names:
                with contextlib.suppress(OSError):  # gone meanwhile
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


async def corral_workspace(manager: Workspaces, repo: Path, task_id: int) -> tuple[float, Path]:
    started = time.perf_counter()
    found = await find_repository(repo)
    assert found is not None
    plan = manager.plan(task_id, "bench task", found, await manager.base_commit(found, None))
    ws = await manager.ensure(plan)
    return time.perf_counter() - started, Path(ws.path)


def plain_worktree(repo: Path, where: Path, n: int) -> float:
    started = time.perf_counter()
    git(repo, "worktree", "add", "-q", "-b", f"plain/{n}", str(where), "HEAD")
    return time.perf_counter() - started


async def main(files: int, rounds: int, base: Path | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="corral-wsbench-", dir=base))
    try:
        repo = tmp / "repo"
        started = time.perf_counter()
        make_repo(repo, files)
        print(f"repository of {files:,} files made in {time.perf_counter() - started:.1f} s"
              f" under {tmp}")
        manager = Workspaces(tmp / "worktrees", copy=[".env", ".env.*"])
        ours, theirs, our_disk, their_disk = [], [], [], []
        for n in range(rounds):
            plain = tmp / "plain" / f"p{n}"  # git names its admin folder after the last part
            # Who goes first alternates: the second finds the repository's files cached.
            if n % 2:
                seconds, path = await corral_workspace(manager, repo, n + 1)
                theirs.append(plain_worktree(repo, plain, n))
            else:
                theirs.append(plain_worktree(repo, plain, n))
                seconds, path = await corral_workspace(manager, repo, n + 1)
            ours.append(seconds)
            their_disk.append(disk_bytes(plain, repo / ".git" / "worktrees" / plain.name))
            our_disk.append(disk_bytes(path, repo / ".git" / "worktrees" / path.name))
            print(f"  round {n + 1}: corral {seconds * 1000:.0f} ms, git worktree add"
                  f" {theirs[-1] * 1000:.0f} ms")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"  median: corral {statistics.median(ours) * 1000:.0f} ms,"
              f" git worktree add {statistics.median(theirs) * 1000:.0f} ms; ratio {ratio:.2f}x")
        print(f"  disk each adds: corral {statistics.median(our_disk) / 2**20:.1f} MiB,"
              f" git worktree add {statistics.median(their_disk) / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where the repository is made")
    args = parser.parse_args()
    asyncio.run(main(args.files, args.rounds, args.dir))
