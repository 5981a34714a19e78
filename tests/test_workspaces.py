"""Workspaces on real git repositories: isolation, commits, review, merge, faults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from corral.models import Workspace
from corral.workspace.manager import (
    MergeRefused,
    WorkspaceError,
    Workspaces,
    find_repository,
)
from tests.gitrepo import git, make_repo, snapshot


async def planned(ws: Workspaces, repo: Path, task_id: int, prompt: str = "do it",
                  base: str | None = None) -> Workspace:
    found = await find_repository(repo)
    assert found is not None
    return ws.plan(task_id, prompt, found, await ws.base_commit(found, base))


@pytest.fixture
def manager(tmp_path: Path) -> Workspaces:
    return Workspaces(tmp_path / "worktrees", copy=[".env", ".env.*"])


async def test_a_task_runs_commits_and_merges_without_touching_the_checkout(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    before = snapshot(repo)
    ws = await manager.ensure(await planned(manager, repo, 7, "Fix the failing test!"))
    assert ws.branch == "corral/7-fix-the-failing-test" and ws.state == "active"
    assert Path(ws.path) == tmp_path / "worktrees" / "7"
    start = await manager.head(ws)
    (Path(ws.path) / "src" / "app.py").write_text("print('fixed')\nprint('more')\n")
    (Path(ws.path) / "new.txt").write_text("untracked but kept\n")
    done = await manager.commit(ws, start, "corral: task 7")
    assert done.commit is not None
    assert sorted(done.files) == [("new.txt", 1, 0), ("src/app.py", 2, 1)]
    assert snapshot(repo) == before  # running the task changed nothing of the user's
    assert "+print('fixed')" in await manager.diff(ws)
    assert "2 files changed" in await manager.diff(ws, stat=True)
    merged = await manager.merge(ws)
    assert git(repo, "rev-parse", "HEAD").strip() == merged
    assert (repo / "new.txt").read_text() == "untracked but kept\n"
    assert git(repo, "status", "--porcelain") == ""
    assert not Path(ws.path).exists()
    assert "corral/7" not in git(repo, "branch", "--list")  # delete_merged


async def test_nothing_changed_means_no_commit(tmp_path: Path, manager: Workspaces) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 1))
    done = await manager.commit(ws, await manager.head(ws), "nothing")
    assert done.commit is None and done.files == []


async def test_many_worktrees_made_at_once_on_one_repository(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    plans = [await planned(manager, repo, n) for n in range(1, 9)]
    made = await asyncio.gather(*(manager.ensure(p) for p in plans))
    assert len({w.path for w in made}) == 8
    assert all((Path(w.path) / "README.md").exists() for w in made)
    assert len(git(repo, "worktree", "list").splitlines()) == 9


async def test_a_conflicting_merge_is_refused_and_the_tree_is_left_as_it_was(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 3))
    start = await manager.head(ws)
    (Path(ws.path) / "README.md").write_text("# the task's title\n")
    await manager.commit(ws, start, "task")
    (repo / "README.md").write_text("# the user's title\n")
    git(repo, "commit", "-qam", "user moved on")
    (repo / "notes.txt").write_text("the user's unrelated work in progress\n")
    before = snapshot(repo)
    with pytest.raises(MergeRefused) as refused:
        await manager.merge(ws)
    assert refused.value.files == ["README.md"] and "conflicts" in refused.value.message
    assert snapshot(repo) == before
    assert Path(ws.path).exists()  # nothing of the task's is lost either


async def test_uncommitted_changes_in_touched_files_refuse_others_are_kept(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 4))
    start = await manager.head(ws)
    (Path(ws.path) / "src" / "app.py").write_text("print('task')\n")
    await manager.commit(ws, start, "task")
    (repo / "src" / "app.py").write_text("print('user, not committed')\n")
    (repo / "README.md").write_text("# user's edit, unrelated\n")
    git(repo, "add", "README.md")  # staged, unrelated
    before = snapshot(repo)
    with pytest.raises(MergeRefused) as refused:
        await manager.merge(ws)
    assert refused.value.files == ["src/app.py"] and "uncommitted" in refused.value.message
    assert snapshot(repo) == before
    (repo / "src" / "app.py").write_text("print('hi')\n")  # the user puts it back
    await manager.merge(ws, squash=True)
    assert (repo / "src" / "app.py").read_text() == "print('task')\n"
    assert (repo / "README.md").read_text() == "# user's edit, unrelated\n"
    assert "M  README.md" in git(repo, "status", "--porcelain")  # still staged, not committed
    assert len(git(repo, "rev-list", "HEAD").split()) == 2  # squash: one new commit


async def test_the_users_branch_moved_on_and_the_merge_still_lands(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 5))
    start = await manager.head(ws)
    (Path(ws.path) / "feature.py").write_text("x = 1\n")
    await manager.commit(ws, start, "task")
    (repo / "other.py").write_text("y = 2\n")
    git(repo, "add", "other.py")
    git(repo, "commit", "-qm", "user's own commit")
    merged = await manager.merge(ws)
    parents = git(repo, "rev-list", "--parents", "-n", "1", merged).split()
    assert len(parents) == 3  # a merge commit with both sides
    assert (repo / "feature.py").exists() and (repo / "other.py").exists()


async def test_strange_repositories_get_clear_errors(tmp_path: Path, manager: Workspaces) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    found = await find_repository(empty)
    assert found is not None
    with pytest.raises(WorkspaceError, match="no commits yet"):
        await manager.base_commit(found, None)
    repo = make_repo(tmp_path / "repo")
    found = await find_repository(repo)
    assert found is not None
    with pytest.raises(WorkspaceError, match="not a commit"):
        await manager.base_commit(found, "no-such-branch")
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    with pytest.raises(WorkspaceError, match="bare repository"):
        await find_repository(bare)
    assert await find_repository(tmp_path) is None  # not a repository: runs in place


async def test_detached_head_refuses_the_merge(tmp_path: Path, manager: Workspaces) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 6))
    start = await manager.head(ws)
    (Path(ws.path) / "f.txt").write_text("f\n")
    await manager.commit(ws, start, "task")
    git(repo, "checkout", "-q", "--detach")
    before = snapshot(repo)
    with pytest.raises(MergeRefused, match="detached HEAD"):
        await manager.merge(ws)
    assert snapshot(repo) == before


async def test_a_taken_branch_name_gets_a_suffix_and_base_is_honoured(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    first = git(repo, "rev-parse", "HEAD").strip()
    (repo / "second.txt").write_text("2\n")
    git(repo, "add", "second.txt")
    git(repo, "commit", "-qm", "second")
    git(repo, "branch", "corral/9-do-it", first)  # left by an earlier corral database
    ws = await manager.ensure(await planned(manager, repo, 9, base=first))
    assert ws.branch == "corral/9-do-it-2" and ws.base_commit == first
    assert not (Path(ws.path) / "second.txt").exists()


async def test_a_worktree_removed_by_hand_comes_back_on_its_branch(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 10))
    start = await manager.head(ws)
    (Path(ws.path) / "work.txt").write_text("kept on the branch\n")
    await manager.commit(ws, start, "task")
    git(repo, "worktree", "remove", "--force", ws.path)
    again = await manager.ensure(ws)
    assert (Path(again.path) / "work.txt").read_text() == "kept on the branch\n"
    git(repo, "worktree", "remove", "--force", ws.path)
    git(repo, "branch", "-D", ws.branch)
    with pytest.raises(WorkspaceError, match="no longer exists"):
        await manager.merge(ws)


async def test_a_worktree_that_cannot_be_made_fails_clearly_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "repo")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the worktrees folder should be")
    manager = Workspaces(blocked)
    plan = await planned(manager, repo, 11)
    with pytest.raises(WorkspaceError, match="cannot make the worktree"):
        await manager.ensure(plan)
    assert "corral/" not in git(repo, "branch", "--list")
    assert len(git(repo, "worktree", "list").splitlines()) == 1


async def test_discard_removes_the_worktree_and_the_branch(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 12))
    await manager.discard(ws)
    assert not Path(ws.path).exists()
    assert ws.branch not in git(repo, "branch", "--list")


async def test_untracked_files_are_copied_by_glob_from_inside_the_repo_only(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    (repo / ".gitignore").write_text(".env*\n")
    (repo / ".env").write_text("TOKEN=local\n")
    (repo / ".env.test").write_text("TOKEN=test\n")
    outside = tmp_path / "secret"
    outside.write_text("not the repo's\n")
    (repo / ".env.link").symlink_to(outside)
    ws = await manager.ensure(await planned(manager, repo, 13))
    assert (Path(ws.path) / ".env").read_text() == "TOKEN=local\n"
    assert (Path(ws.path) / ".env.test").read_text() == "TOKEN=test\n"
    assert not (Path(ws.path) / ".env.link").exists()


async def test_submodules_are_initialised(tmp_path: Path, manager: Workspaces) -> None:
    lib = make_repo(tmp_path / "lib", {"lib.py": "LIB = 1\n"})
    repo = make_repo(tmp_path / "repo")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "vendor/lib")
    git(repo, "commit", "-qm", "add a submodule")
    ws = await manager.ensure(await planned(manager, repo, 14))
    assert (Path(ws.path) / "vendor" / "lib" / "lib.py").read_text() == "LIB = 1\n"


async def test_status_says_ahead_behind_and_disk_use(tmp_path: Path, manager: Workspaces) -> None:
    repo = make_repo(tmp_path / "repo")
    ws = await manager.ensure(await planned(manager, repo, 15))
    start = await manager.head(ws)
    (Path(ws.path) / "a.txt").write_text("a\n" * 1000)
    await manager.commit(ws, start, "task")
    (repo / "b.txt").write_text("b\n")
    git(repo, "add", "b.txt")
    git(repo, "commit", "-qm", "user")
    status = await manager.status(ws)
    assert (status["ahead"], status["behind"]) == (1, 1)
    assert isinstance(status["disk_bytes"], int) and status["disk_bytes"] > 2000


async def test_a_worktree_half_made_when_the_daemon_died_is_made_again(
    tmp_path: Path, manager: Workspaces
) -> None:
    repo = make_repo(tmp_path / "repo")
    plan = await planned(manager, repo, 16)
    # What a kill in the middle of `git worktree add` leaves: the branch, part of the tree.
    git(repo, "worktree", "add", "-q", "-b", plan.branch, plan.path, plan.base_commit)
    (Path(plan.path) / "src" / "app.py").unlink()
    ws = await manager.ensure(plan)
    assert (Path(ws.path) / "src" / "app.py").read_text() == "print('hi')\n"
    done = await manager.commit(ws, await manager.head(ws), "nothing lost")
    assert done.files == []
