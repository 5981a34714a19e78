"""FolderMaker: execution folders made on threads, a batch split only when folders are dear."""

from __future__ import annotations

from pathlib import Path

from corral.executor.folders import MIN_PART_S, FolderMaker


def _made(folder: Path) -> bool:
    return (folder / "stdout.log").is_file() and (folder / "stdout.log").read_bytes() == b""


async def test_cheap_folders_are_made_in_one_part_and_their_cost_is_learned(
    tmp_path: Path,
) -> None:
    maker = FolderMaker()
    try:
        folders = [tmp_path / str(n) for n in range(8)]
        ready = maker.make(folders)
        assert len(ready) == 8 and len(set(ready)) == 1  # one hop for the batch
        for future in ready:
            await future
        assert all(_made(f) for f in folders)
        assert 0 < maker.cost_s < 1  # measured, not assumed
    finally:
        maker.shutdown()


async def test_dear_folders_are_split_over_the_threads(tmp_path: Path) -> None:
    maker = FolderMaker(max_threads=4)
    try:
        maker.cost_s = 4 * MIN_PART_S  # as if the disk had turned slow
        folders = [tmp_path / str(n) for n in range(10)]
        ready = maker.make(folders)
        parts = list(dict.fromkeys(ready))
        assert len(parts) == 4 and [ready.count(p) for p in parts] == [3, 3, 3, 1]
        for future in parts:
            await future
        assert all(_made(f) for f in folders)
        # A single folder is never split, however dear.
        one = maker.make([tmp_path / "alone"])
        assert len(one) == 1
        await one[0]
        assert _made(tmp_path / "alone")
    finally:
        maker.shutdown()


async def test_a_shut_down_maker_leaves_folders_to_the_runners(tmp_path: Path) -> None:
    maker = FolderMaker()
    maker.shutdown()
    maker.shutdown()  # twice is harmless
    ready = maker.make([tmp_path / "1", tmp_path / "2"])
    assert all(f.done() and f.result() is None for f in ready)
    assert not (tmp_path / "1").exists()
