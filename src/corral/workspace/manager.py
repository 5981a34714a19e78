"""Workspaces: each task in its own git worktree and branch, never the user's own checkout.

:meth:`Workspaces.plan` checks a task's repository at submit time and fixes the commit the task
starts from. :meth:`Workspaces.ensure` makes the worktree when an execution is about to run
(serialised per repository, one retry after cleaning a partial one), or makes it again from the
branch when the user removed it. :meth:`Workspaces.commit` records what an execution changed as
a commit on the task's branch. :meth:`Workspaces.merge` lands the branch in the user's checkout
only when that cannot conflict and touches none of their uncommitted work; otherwise it refuses
and the user's tree stays exactly as it was. Nothing here knows about the database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.models import Workspace
from corral.workspace.git import GitError, git, run_git

log = logging.getLogger(__name__)

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
_SLUG_WORDS = re.compile(r"[a-z0-9]+")


class WorkspaceError(GitError):
    """A workspace cannot be made or used; the message says why, in git's words where git's."""

    code = "workspace_error"


class MergeRefused(WorkspaceError):
    """Merging would conflict or touch uncommitted work; ``files`` names what is in the way."""

    code = "merge_refused"

    def __init__(self, message: str, files: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.files = sorted(files)

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "files": self.files}


@dataclass(frozen=True, slots=True)
class Repository:
    """Where a working dir sits: its repository's top folder, and the dir relative to it."""

    top: Path
    subdir: Path


@dataclass(frozen=True, slots=True)
class CommitStat:
    """What one execution changed, per file and in total (a commit on the task's branch)."""

    commit: str | None
    files: list[tuple[str, int, int]]  # path, insertions, deletions

    @property
    def insertions(self) -> int:
        return sum(f[1] for f in self.files)

    @property
    def deletions(self) -> int:
        return sum(f[2] for f in self.files)


def slug(prompt: str, words: int = 5, max_chars: int = 32) -> str:
    """A branch-name fragment from a prompt: ``fix-the-failing-test``."""
    found = _SLUG_WORDS.findall(prompt.lower())[:words]
    text = "-".join(found)[:max_chars].strip("-")
    return text or "task"


async def find_repository(workdir: Path) -> Repository | None:
    """The repository ``workdir`` is in (None: not in one). A bare repository is an error."""
    inside = await run_git(workdir, "rev-parse", "--is-inside-work-tree")
    if not inside.ok:
        return None
    if inside.out.strip() != "true":
        raise WorkspaceError(
            f"{workdir} is inside a bare repository or a .git folder: there is no working tree"
            " to run an agent in")
    top = Path((await git(workdir, "rev-parse", "--show-toplevel")).strip())
    prefix = (await git(workdir, "rev-parse", "--show-prefix")).strip()  # "" at the top
    return Repository(top, Path(prefix or "."))


class Workspaces:
    """Worktrees under ``root`` (``root/<task id>``), branches ``<prefix><id>-<slug>``."""

    def __init__(self, root: Path, *, branch_prefix: str = "corral/",
                 copy: Iterable[str] = (), delete_merged: bool = True) -> None:
        self.root = root
        self.branch_prefix = branch_prefix
        self.copy = list(copy)
        self.delete_merged = delete_merged
        self._locks: dict[Path, asyncio.Lock] = {}

    def _lock(self, repo: Path) -> asyncio.Lock:
        # git's own lock files (.git/config.lock, .git/worktrees/…) race when worktrees are
        # added at once: one at a time per repository.
        return self._locks.setdefault(repo, asyncio.Lock())

    # -- submit time -------------------------------------------------------------------------

    async def base_commit(self, repo: Repository, base_ref: str | None) -> str:
        """The commit a new task starts from: the repository's HEAD now, or ``base_ref``."""
        ref = base_ref or "HEAD"
        result = await run_git(repo.top, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        if not result.ok:
            if base_ref is None:
                raise WorkspaceError(
                    f"{repo.top} has no commits yet: commit something first, or submit with"
                    " --no-isolate to run in it directly")
            raise WorkspaceError(f"--base {base_ref!r} is not a commit in {repo.top}")
        return result.out.strip()

    def plan(self, task_id: int, prompt: str, repo: Repository, base_commit: str, *,
             base_branch: str | None = None) -> Workspace:
        """The workspace a task will run in (nothing is made until it runs). With
        ``base_branch`` (a dependency's) it starts from that branch's tip when it is made."""
        return Workspace(
            repo=str(repo.top), path=str(self.root / str(task_id)),
            branch=f"{self.branch_prefix}{task_id}-{slug(prompt)}",
            base_commit=base_commit, subdir=str(repo.subdir), state="planned",
            base_branch=base_branch)

    # -- before and after an execution -------------------------------------------------------

    async def ensure(self, ws: Workspace) -> Workspace:
        """The worktree exists and is on the task's branch; made (or made again) if not.

        Returns the workspace as it now is (the branch name changes when it was taken).
        """
        path, repo = Path(ws.path), Path(ws.repo)
        # Still "planned" means no worktree was ever finished: whatever is at the path is what
        # a daemon killed while making it left behind, and is made again, not trusted.
        if ws.state != "planned" and await self._is_worktree_of(path, ws.branch):
            return ws.replace(state="active")
        async with self._lock(repo):
            if ws.state == "planned" and await asyncio.to_thread(os.path.lexists, path):
                await self._clean_partial(ws)
            if ws.state == "planned" and ws.base_branch:
                # The dependency's work, as it stands now that the dependency has finished (a
                # branch merged and deleted meanwhile leaves the base fixed at submit).
                tip = await run_git(repo, "rev-parse", "-q", "--verify",
                                    f"refs/heads/{ws.base_branch}^{{commit}}")
                if tip.ok:
                    ws = ws.replace(base_commit=tip.out.strip())
            try:
                made = await self._add(ws)
            except GitError as first:
                log.warning("worktree for %s failed (%s); cleaning up and trying once more",
                            ws.branch, first.message)
                await self._clean_partial(ws)
                try:
                    made = await self._add(ws)
                except GitError as second:
                    await self._clean_partial(ws)
                    raise WorkspaceError(
                        f"cannot make the worktree {path} for {ws.branch}: {second.message}"
                    ) from None
        await self._init_submodules(path)
        await asyncio.to_thread(self._copy_untracked, repo, path)
        return made.replace(state="active")

    async def _is_worktree_of(self, path: Path, branch: str) -> bool:
        if not (path / ".git").exists():
            return False
        head = await run_git(path, "symbolic-ref", "-q", "HEAD")
        return head.ok and head.out.strip() == f"refs/heads/{branch}"

    async def _branch_exists(self, repo: Path, branch: str) -> bool:
        return (await run_git(repo, "show-ref", "--verify", "-q", f"refs/heads/{branch}")).ok

    async def _add(self, ws: Workspace) -> Workspace:
        repo, path = Path(ws.repo), Path(ws.path)
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:  # a full disk, a file in the way
            raise WorkspaceError(f"cannot make {path.parent}: {exc.strerror or exc}") from None
        if ws.state in ("active", "removed") and await self._branch_exists(repo, ws.branch):
            # The task ran before: its branch holds its work; the worktree comes back on it.
            await git(repo, "worktree", "prune")
            await git(repo, "worktree", "add", "--quiet", str(path), ws.branch)
            return ws
        branch = ws.branch
        n = 2
        while await self._branch_exists(repo, branch):  # left by an earlier database
            branch = f"{ws.branch}-{n}"
            n += 1
        await git(repo, "worktree", "add", "--quiet", "-b", branch, str(path), ws.base_commit)
        return ws.replace(branch=branch)

    async def _clean_partial(self, ws: Workspace) -> None:
        repo, path = Path(ws.repo), Path(ws.path)
        await run_git(repo, "worktree", "remove", "--force", str(path))
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        await run_git(repo, "worktree", "prune")
        if ws.state == "planned":  # a branch made in the failed attempt holds nothing yet
            tip = await run_git(repo, "rev-parse", "-q", "--verify", f"refs/heads/{ws.branch}")
            if tip.ok and tip.out.strip() == ws.base_commit:
                await run_git(repo, "branch", "-D", ws.branch)

    async def _init_submodules(self, path: Path) -> None:
        if await asyncio.to_thread((path / ".gitmodules").exists):
            # The submodules the user's own repository names (local paths included).
            await git(path, "-c", "protocol.file.allow=always", "submodule", "update",
                      "--init", "--recursive", "--quiet")

    def _copy_untracked(self, repo: Path, path: Path) -> None:
        """Files the agent needs that git does not carry (``.env``…), from inside the repo only."""
        top = repo.resolve()
        for pattern in self.copy:
            for source in top.glob(pattern):
                resolved = source.resolve()
                if not resolved.is_file() or not resolved.is_relative_to(top):
                    continue
                target = path / source.relative_to(repo)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(resolved, target)

    async def head(self, ws: Workspace) -> str:
        return (await git(Path(ws.path), "rev-parse", "HEAD")).strip()

    async def commit(self, ws: Workspace, start: str, message: str) -> CommitStat:
        """Commit whatever the agent changed (untracked files included, .gitignore honoured);
        the change from ``start`` to the new head, per file."""
        path = Path(ws.path)
        await git(path, "add", "-A")
        staged = await run_git(path, "diff", "--cached", "--quiet")
        commit = None
        if not staged.ok:
            await git(path, "commit", "--no-verify", "-q", "-m", message)
        head = (await git(path, "rev-parse", "HEAD")).strip()
        if head != start:
            commit = head
        return CommitStat(commit, await self._numstat(path, start, head))

    async def _numstat(self, path: Path, start: str, end: str) -> list[tuple[str, int, int]]:
        out = await git(path, "diff", "--numstat", "-z", "--no-renames", start, end)
        files = []
        fields = out.split("\0")
        for entry in fields:
            if not entry:
                continue
            added, deleted, name = entry.split("\t", 2)
            files.append((name, 0 if added == "-" else int(added),
                          0 if deleted == "-" else int(deleted)))
        return files

    # -- review and land ---------------------------------------------------------------------

    async def _tip(self, ws: Workspace) -> str:
        result = await run_git(Path(ws.repo), "rev-parse", "-q", "--verify",
                               f"refs/heads/{ws.branch}^{{commit}}")
        if not result.ok:
            raise WorkspaceError(f"the task's branch {ws.branch} no longer exists in {ws.repo}")
        return result.out.strip()

    async def diff(self, ws: Workspace, *, stat: bool = False) -> str:
        """The task's branch against the commit it started from: a patch, or a stat."""
        tip = await self._tip(ws)
        args = ["--stat"] if stat else ["--binary"]
        return await git(Path(ws.repo), "diff", *args, ws.base_commit, tip)

    async def merge(self, ws: Workspace, *, squash: bool = False) -> str:
        """Land the branch in the branch checked out in the user's repo; returns the new commit.

        Refuses (:class:`MergeRefused`) rather than conflict or touch uncommitted work, and then
        the user's tree, index and HEAD are exactly as they were.
        """
        repo = Path(ws.repo)
        tip = await self._tip(ws)
        await self._refuse_uncommitted_worktree(ws)
        target = await run_git(repo, "symbolic-ref", "-q", "HEAD")
        if not target.ok:
            raise MergeRefused(f"{repo} has a detached HEAD: check out the branch to merge into")
        head = (await git(repo, "rev-parse", "HEAD")).strip()
        base = (await git(repo, "merge-base", head, tip)).strip()
        if base == tip:
            raise MergeRefused(f"{ws.branch} has nothing that {target.out.strip()} lacks")
        touched = set(filter(None, (await git(repo, "diff", "--name-only", "-z", base, tip)
                                    ).split("\0")))
        dirty = touched & await _uncommitted_files(repo)
        if dirty:
            raise MergeRefused(
                "uncommitted changes in files the task changed: " + ", ".join(sorted(dirty))
                + "; commit or stash them first", dirty)
        tree = await run_git(repo, "merge-tree", "--write-tree", "--name-only", "--no-messages",
                             head, tip)
        if not tree.ok:
            conflicted = [line for line in tree.out.splitlines()[1:] if line]
            if tree.code == 1:
                raise MergeRefused(f"{ws.branch} conflicts with {target.out.strip()} in: "
                                   + ", ".join(conflicted), conflicted)
            raise WorkspaceError(f"git merge-tree failed: {tree.err.strip()}")
        parents = ["-p", head] if squash else ["-p", head, "-p", tip]
        message = f"{'Squash' if squash else 'Merge'} {ws.branch} (corral)"
        commit = (await git(repo, "commit-tree", tree.out.splitlines()[0], *parents,
                            "-m", message, env=await _user_identity(repo))).strip()
        # A fast-forward to the commit just made: git leaves every unrelated local change alone,
        # and refuses (changing nothing) if the branch moved meanwhile.
        moved = await run_git(repo, "merge", "--ff-only", "--quiet", commit)
        if not moved.ok:
            raise MergeRefused(f"{target.out.strip()} could not be moved to the merge:"
                               f" {moved.err.strip() or moved.out.strip()}")
        await self.remove_worktree(ws)
        if self.delete_merged:
            await run_git(repo, "branch", "-D", ws.branch)
        return commit

    async def _refuse_uncommitted_worktree(self, ws: Workspace) -> None:
        path = Path(ws.path)
        if await asyncio.to_thread((path / ".git").exists):
            left = await _uncommitted_files(path)
            if left:
                raise MergeRefused(f"the worktree {path} has changes no execution committed: "
                                   + ", ".join(sorted(left)), left)

    async def remove_worktree(self, ws: Workspace) -> None:
        """The worktree goes; its branch stays."""
        repo, path = Path(ws.repo), Path(ws.path)
        await run_git(repo, "worktree", "remove", "--force", str(path))
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        await run_git(repo, "worktree", "prune")

    async def discard(self, ws: Workspace) -> None:
        """The worktree and the branch both go."""
        await self.remove_worktree(ws)
        if await self._branch_exists(Path(ws.repo), ws.branch):
            await git(Path(ws.repo), "branch", "-D", ws.branch)

    async def status(self, ws: Workspace) -> dict[str, object]:
        """Ahead of and behind the user's checked-out branch, and the worktree's disk use."""
        repo, path = Path(ws.repo), Path(ws.path)
        ahead = behind = None
        tip = await run_git(repo, "rev-parse", "-q", "--verify", f"refs/heads/{ws.branch}")
        if tip.ok:
            counts = await run_git(repo, "rev-list", "--left-right", "--count",
                                   f"HEAD...{tip.out.strip()}")
            if counts.ok:
                behind, ahead = (int(n) for n in counts.out.split())
        return {"branch_exists": tip.ok, "ahead": ahead, "behind": behind,
                "disk_bytes": await asyncio.to_thread(_disk_use, path)}

    async def prune(self, repos: Iterable[str]) -> None:
        """``git worktree prune`` in each repository (worktrees removed by hand, crashes)."""
        for repo in set(repos):
            if await asyncio.to_thread(Path(repo).is_dir):
                await run_git(Path(repo), "worktree", "prune")


async def _uncommitted_files(top: Path) -> set[str]:
    """Paths with changes not committed (staged, unstaged, untracked), relative to ``top``."""
    out = await git(top, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    files: set[str] = set()
    entries = iter(out.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        files.add(entry[3:])
        if entry[0] in "RC":  # a rename or copy names its source in the next field
            files.add(next(entries, ""))
    files.discard("")
    return files


async def _user_identity(repo: Path) -> dict[str, str]:
    """The user's own name for the merge commit when they set one, else corral's."""
    env: dict[str, str] = {}
    for key, names in (("user.name", ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")),
                       ("user.email", ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"))):
        value = (await run_git(repo, "config", "--get", key)).out.strip()
        if value:
            env.update(dict.fromkeys(names, value))
    return env


def _disk_use(path: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue
    return total
