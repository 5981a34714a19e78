"""Execution folders, made off the event loop on as many threads as the disk calls for.

Making a folder and its empty ``stdout.log`` costs from about 10 us (tmpfs) to over a
millisecond (this VM's disk when it is busy) of kernel time. While folders are cheap, one
thread makes a whole batch: more threads would only fight the event loop for the GIL (two
cost about 15% of dispatch throughput on tmpfs). Once they are dear, a batch is split over up
to four threads, whose system calls then overlap: two threads made 1.5-1.8x the folders per
second of one when a folder cost about a millisecond here. The cost is measured as folders are
made, so the split follows the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from corral.executor.runner import prepare_exec_dirs

log = logging.getLogger(__name__)

MAX_THREADS = 4
# A batch is split only into parts expected to take at least this long: for less, another
# thread's hop and its share of the GIL cost more than the overlap saves.
MIN_PART_S = 0.001
# Weight of the newest measurement in the running estimate of what one folder costs.
_SMOOTHING = 0.3


class FolderMaker:
    """Makes execution folders (and empty ``stdout.log`` files) on a few worker threads."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        # What one folder has been costing, in seconds: it decides how a batch is split.
        self.cost_s = 0.0
        # One single-thread executor per part, so part k always runs on thread k: cheap
        # batches, one part each, queue on one thread rather than overlap on several. Each
        # thread starts only when first needed.
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"corral-files-{n}")
                         for n in range(max_threads)]

    def make(self, folders: Sequence[Path]) -> list[asyncio.Future[float | None]]:
        """Start making ``folders``; one future per folder, done once its part of the batch is.

        Never raises: the tasks are already claimed, and a runner makes its own folder when
        this could not (the threads are shut down or broken).
        """
        loop = asyncio.get_running_loop()
        count = len(folders)
        parts = max(1, min(self.max_threads, count, int(count * self.cost_s / MIN_PART_S)))
        size = -(-count // parts)
        ready: list[asyncio.Future[float | None]] = []
        for thread, start in zip(self._threads, range(0, count, size), strict=False):
            part = folders[start:start + size]
            future: asyncio.Future[float | None]
            try:
                future = loop.run_in_executor(thread, _make_timed, part)
            except RuntimeError:
                log.warning("the file threads are unavailable; runners will make their folders")
                future = loop.create_future()
                future.set_result(None)
            else:
                future.add_done_callback(self._learn)
            ready.extend([future] * len(part))
        return ready

    def _learn(self, done: asyncio.Future[float | None]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        cost_s = done.result()
        if cost_s is not None:
            self.cost_s += _SMOOTHING * (cost_s - self.cost_s)

    def shutdown(self) -> None:
        """Take no more work; a part already started still finishes. Safe to call twice."""
        for thread in self._threads:
            thread.shutdown(wait=False)


def _make_timed(folders: Sequence[Path]) -> float:
    # This thread's own CPU time, the kernel's share included: wall time would also count
    # the waits for the GIL, which more threads would only lengthen.
    started = time.thread_time()
    prepare_exec_dirs(folders)
    return (time.thread_time() - started) / len(folders)
