"""Execution folders made ahead of need by the helper process, and what happens without it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import pytest

from corral.executor import folders
from corral.executor.folders import FolderMaker
from corral.executor.mkfolders import Maker, serve
from tests.conftest import until


def _made(folder: Path) -> bool:
    return (folder / "stdout.log").is_file() and (folder / "stdout.log").read_bytes() == b""


async def _all_made(*folders: Path) -> bool:
    return all(_made(f) for f in folders)


def test_helper_protocol_batches_across_reads(tmp_path: Path) -> None:
    a, b, c = (os.fsencode(tmp_path / name) for name in ("a", "b", "deep/c"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stdout.log").write_bytes(b"kept\n")

    class Trickle(io.BytesIO):  # hands the stream over a few bytes at a time
        def read1(self, size: int | None = -1) -> bytes:
            return super().read1(3)

    sink = io.BytesIO()
    serve(Trickle(a + b"\0" + b + b"\0\0" + c + b"\0\0"), sink)
    assert sink.getvalue() == b".."  # one answer per batch
    assert (tmp_path / "a" / "stdout.log").read_bytes() == b"kept\n"  # never truncated
    assert _made(tmp_path / "b") and _made(tmp_path / "deep" / "c")


def test_helper_splits_a_batch_only_when_folders_are_dear(tmp_path: Path) -> None:
    cheap, dear = Maker(), Maker()
    cheap.make([os.fsencode(tmp_path / f"c{n}") for n in range(8)])
    assert cheap._threads is None and 0 < cheap.cost_s < Maker.MIN_PART_S  # one thread
    dear.cost_s = 4 * Maker.MIN_PART_S  # as if the disk had turned slow
    dear.make([os.fsencode(tmp_path / f"d{n}") for n in range(10)])
    assert dear._threads is not None  # split over threads
    dear._threads.shutdown()
    assert all(_made(tmp_path / f"{k}{n}") for k, n in [("c", 7), *(("d", n) for n in range(10))])


async def test_folders_are_made_on_request_without_ahead(tmp_path: Path) -> None:
    maker = FolderMaker(tmp_path)
    await maker.start(1)
    try:
        ready = maker.make([1, 2, 3])
        assert len(set(ready)) == 1  # one batch, one answer
        await ready[0]
        assert await _all_made(*(tmp_path / str(n) for n in (1, 2, 3)))
    finally:
        await maker.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


async def test_folders_ahead_are_handed_over_and_the_unclaimed_removed(tmp_path: Path) -> None:
    maker = FolderMaker(tmp_path, ahead=4)
    await maker.start(5)  # the store's next execution id
    await until(lambda: _all_made(*(tmp_path / str(n) for n in range(5, 9))))
    ready = maker.make([5, 6])
    assert all(f.done() for f in ready)  # waiting already: nothing on the claim's path
    await until(lambda: _all_made(tmp_path / "9", tmp_path / "10"))  # topped up past 6
    (tmp_path / "9" / "stdout.log").write_bytes(b"used\n")
    await maker.close()
    await maker.close()  # twice is harmless
    # Claimed ones stay, unclaimed empty ones go, one holding anything is kept.
    assert sorted(os.listdir(tmp_path)) == ["5", "6", "9"]


async def test_an_id_past_the_folders_ahead_is_made_at_once(tmp_path: Path) -> None:
    maker = FolderMaker(tmp_path, ahead=2)
    await maker.start(1)
    try:
        ready = maker.make([10])  # ids moved on without this maker: asked for now
        await ready[0]
        assert _made(tmp_path / "10")
        await until(lambda: _all_made(tmp_path / "11", tmp_path / "12"))
    finally:
        await maker.close()
    # Folders made ahead for ids that went by unclaimed are removed too.
    assert sorted(os.listdir(tmp_path)) == ["10"]


async def test_a_dead_helper_leaves_folders_to_the_runners(tmp_path: Path) -> None:
    maker = FolderMaker(tmp_path)
    await maker.start(1)
    pid = maker.helper_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def noticed() -> bool:
        return maker.helper_pid is None

    await until(noticed)
    ready = maker.make([1, 2])
    assert all(f.done() for f in ready)  # answered at once: nobody waits for the dead
    assert not (tmp_path / "1").exists()
    await maker.close()


async def test_the_helper_gets_no_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-never-here")
    monkeypatch.setenv("GEMINI_API_KEY", "gm-never-here")
    maker = FolderMaker(tmp_path)
    await maker.start(1)
    try:
        assert maker.helper_pid is not None
        environ = await asyncio.to_thread(Path(f"/proc/{maker.helper_pid}/environ").read_bytes)
        assert b"never-here" not in environ and b"API_KEY" not in environ
        ready = maker.make([1])  # and it still works without them
        await ready[0]
        assert _made(tmp_path / "1")
    finally:
        await maker.close()


async def test_a_stuck_helper_is_killed_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folders, "_EXIT_WAIT_S", 0.2)
    maker = FolderMaker(tmp_path, ahead=2)
    await maker.start(1)
    pid = maker.helper_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # as if stuck on a dead disk
    await asyncio.wait_for(maker.close(), 10)
    assert maker.helper_pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_the_helper_stops_when_the_daemon_says_not_on_a_signal(tmp_path: Path) -> None:
    maker = FolderMaker(tmp_path)
    await maker.start(1)
    pid = maker.helper_pid
    assert pid is not None
    await maker.make([1])[0]  # answering, so past its start-up
    for sig in (signal.SIGINT, signal.SIGTERM):  # what a terminal or systemd sends the group
        os.kill(pid, sig)
    ready = maker.make([2])  # still answering
    await asyncio.wait_for(ready[0], 10)
    assert _made(tmp_path / "2") and maker.helper_pid == pid
    await maker.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
