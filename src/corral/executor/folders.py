"""Execution folders, made ahead of need by a helper process, never on the event loop.

Making a folder and its empty ``stdout.log`` costs from about 10 us (tmpfs) to over a
millisecond (this VM's disk when it is busy) of kernel time, so it never runs on the loop.

* Ahead of need: execution ids come from one sequence that only this daemon advances (the data
  folder is locked), so the next ids are known. A few folders past the last claimed id are kept
  made, and a claimed task usually finds its folder waiting instead of waiting for it.
* In a helper process (:mod:`corral.executor.mkfolders`), not a thread: a thread shares the GIL
  with the event loop and takes it back after every system call. Folders made ahead by a
  thread made dispatch slower; made by the helper, 15-25% faster.
* If the helper cannot start or dies, folders are left to the runners, which make their own
  off the loop: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from corral.executor.mkfolders import ACK, END, STDOUT_LOG

log = logging.getLogger(__name__)

Made = asyncio.Future[None]
# How long the helper gets to finish its last batches and exit once its stdin is closed.
_EXIT_WAIT_S = 5.0


class FolderMaker:
    """Makes execution folders (and empty ``stdout.log`` files) under ``root``.

    ``ahead`` folders past the last claimed execution id are kept made once :meth:`start` has
    said where the ids stand; 0 makes folders only when asked.
    """

    def __init__(self, root: Path, *, ahead: int = 0) -> None:
        self.root = root
        self.ahead = ahead
        self._prefix = os.fsencode(root) + b"/"
        self._helper: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._answers: collections.deque[Made] = collections.deque()  # batches sent, in order
        self._ahead_made: dict[int, Made] = {}  # execution id -> its batch
        self._next_ahead = 0  # the first id not yet asked for ahead; 0 until start
        self._closed = False

    def folder(self, execution_id: int) -> Path:
        return self.root / str(execution_id)

    @property
    def helper_pid(self) -> int | None:
        return None if self._helper is None else self._helper.pid

    async def start(self, next_id: int) -> None:
        """Start the helper; ``next_id`` is the next execution id the store will hand out."""
        try:
            self._helper = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "corral.executor.mkfolders",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_helper_env())
        except OSError as exc:
            log.warning("the folder helper did not start (%s); runners will make their folders",
                        exc)
            return
        self._reader = asyncio.create_task(self._read_answers(self._helper),
                                           name="corral-folder-answers")
        self._next_ahead = next_id
        self._top_up(next_id - 1)

    def make(self, execution_ids: Sequence[int]) -> list[Made]:
        """Folders for claimed executions; one future per id, done once its folder exists.

        A folder made ahead is handed over as it is; the rest are asked for now, and the
        folders ahead are topped up past the last id. Never raises: the tasks are already
        claimed, and a runner makes its own folder when the helper could not.
        """
        if not execution_ids:
            return []
        missing = [i for i in execution_ids if i not in self._ahead_made]
        if missing:
            now = self._ask(missing)
            self._ahead_made.update(dict.fromkeys(missing, now))
        done = [self._ahead_made.pop(i) for i in execution_ids]
        self._top_up(max(execution_ids))
        return done

    def _top_up(self, last_claimed: int) -> None:
        if self.ahead <= 0 or self._next_ahead <= 0:
            return
        start = max(self._next_ahead, last_claimed + 1)
        end = last_claimed + self.ahead
        if start > end:
            return
        ids = range(start, end + 1)
        self._ahead_made.update(dict.fromkeys(ids, self._ask(ids)))
        self._next_ahead = end + 1

    def _ask(self, execution_ids: Sequence[int]) -> Made:
        made: Made = asyncio.get_running_loop().create_future()
        helper = self._helper
        if helper is None or helper.stdin is None or helper.stdin.is_closing() or self._closed:
            made.set_result(None)
            return made
        self._answers.append(made)
        helper.stdin.write(b"".join(b"%s%d%s" % (self._prefix, i, END) for i in execution_ids)
                           + END)
        return made

    async def _read_answers(self, helper: asyncio.subprocess.Process) -> None:
        assert helper.stdout is not None
        try:
            while answers := await helper.stdout.read(4096):
                for _ in range(min(answers.count(ACK), len(self._answers))):
                    made = self._answers.popleft()
                    if not made.done():
                        made.set_result(None)
        finally:
            # Gone (closed, or it died): whatever is unanswered is left to the runners.
            if not self._closed:
                log.warning("the folder helper exited; runners will make their folders")
            self._helper = None
            while self._answers:
                made = self._answers.popleft()
                if not made.done():
                    made.set_result(None)

    async def close(self) -> None:
        """Stop the helper, then remove folders made ahead and never claimed.

        Only a folder still holding nothing but an empty ``stdout.log`` is removed. Safe to
        call twice. Folders a crash leaves behind are used by the next start, whose ids
        continue from the same place.
        """
        self._closed = True
        helper, reader = self._helper, self._reader
        if helper is not None:
            if helper.stdin is not None:
                helper.stdin.close()
            try:
                await asyncio.wait_for(helper.wait(), _EXIT_WAIT_S)
            except TimeoutError:  # stuck on a dead disk: it has nothing left to promise
                with contextlib.suppress(ProcessLookupError):
                    helper.kill()
                await helper.wait()
        if reader is not None:
            await asyncio.shield(reader)  # it ends at the helper's exit, answering the rest
        unclaimed = [self.folder(i) for i in sorted(self._ahead_made)]
        self._ahead_made.clear()
        if unclaimed:
            await asyncio.to_thread(_remove_unused, unclaimed)


def _helper_env() -> dict[str, str]:
    # What it takes to find and run the module, and nothing else: no API key reaches it.
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "SYSTEMROOT")
    return {k: v for k, v in os.environ.items() if k in keep}


def _remove_unused(folders: Sequence[Path]) -> None:
    name = STDOUT_LOG
    for folder in folders:
        with contextlib.suppress(OSError):
            # Only what the helper made and nobody used: one empty stdout.log.
            if os.listdir(folder) == [name] and os.stat(folder / name).st_size == 0:
                os.unlink(folder / name)
                os.rmdir(folder)
