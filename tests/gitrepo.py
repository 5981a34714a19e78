"""Real git repositories for tests, and a snapshot of everything of the user's in one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

BRANCH_PREFIX = "corral/"


def git(repo: Path, *args: str, check: bool = True) -> str:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
           "GIT_AUTHOR_NAME": "User", "GIT_AUTHOR_EMAIL": "user@example.com",
           "GIT_COMMITTER_NAME": "User", "GIT_COMMITTER_EMAIL": "user@example.com",
           "LC_ALL": "C"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout


def make_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    """A repository with one commit of ``files`` on branch main."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.name", "User")
    git(path, "config", "user.email", "user@example.com")
    default = {"README.md": "# project\n", "src/app.py": "print('hi')\n"}
    for name, text in (files or default).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def snapshot(repo: Path) -> dict[str, Any]:
    """Everything of the user's: files, HEAD, index, status, their branches, stash."""
    files = {}
    for folder, dirs, names in os.walk(repo):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in names:
            path = Path(folder, name)
            files[str(path.relative_to(repo))] = path.read_bytes()
    branches = [line for line in git(repo, "for-each-ref", "--format=%(refname) %(objectname)",
                                     "refs/heads").splitlines()
                if not line.startswith(f"refs/heads/{BRANCH_PREFIX}")]
    return {
        "files": files,
        "head": git(repo, "rev-parse", "HEAD"),
        "symbolic_head": git(repo, "symbolic-ref", "-q", "HEAD", check=False),
        "index": git(repo, "ls-files", "-s"),
        "status": git(repo, "status", "--porcelain=v1", "--untracked-files=all"),
        "branches": branches,
        "stash": git(repo, "stash", "list"),
    }
