"""Finished logs are kept compressed: ``stdout.log`` becomes ``stdout.log.gz`` once its run ended
(when it is big enough to be worth it).

A log is written plain while its run goes on (``logs -f`` reads it as it grows), then the pool
compresses it. Readers never need to know which form they find: :func:`open_log` opens either.
The switch is safe against a reader at any moment: the compressed file is complete and renamed
into place before the plain one is unlinked, and a reader holding the plain file open reads it
to its end.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
from pathlib import Path

GZ_SUFFIX = ".gz"
# Smaller logs stay plain: they fill a disk block or two either way, and compressing one costs
# about 460 µs of CPU here (mostly zlib's set-up), which a benchmark of many short tasks showed
# as a third of a task's daemon CPU. Real agent runs write far more and are compressed.
COMPRESS_FROM_BYTES = 64 * 1024


def open_log(path: Path) -> io.BufferedIOBase:
    """``path`` or, once compressed, ``path.gz``, as a binary file of the plain bytes.

    Raises FileNotFoundError when neither exists.
    """
    try:
        return path.open("rb")
    except FileNotFoundError:
        return gzip.open(path.with_name(path.name + GZ_SUFFIX), "rb")


def log_exists(path: Path) -> bool:
    return path.exists() or path.with_name(path.name + GZ_SUFFIX).exists()


def worth_compressing(path: Path) -> bool:
    try:
        return path.stat().st_size >= COMPRESS_FROM_BYTES
    except FileNotFoundError:
        return False


def compress(path: Path) -> bool:
    """Replace ``path`` by ``path.gz``; False when there is nothing (left) to compress.

    Blocking: run it in a thread.
    """
    target = path.with_name(path.name + GZ_SUFFIX)
    partial = path.with_name(path.name + GZ_SUFFIX + ".partial")
    try:
        with path.open("rb") as plain:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # as private
            with open(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                      compresslevel=6) as packed:
                shutil.copyfileobj(plain, packed, 1024 * 1024)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        return False
    os.replace(partial, target)
    path.unlink()
    return True
