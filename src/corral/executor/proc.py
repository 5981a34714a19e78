"""Running an agent CLI as a child process: no shell, its own process group, bounded memory.

``run_agent_process`` starts the program, feeds the prompt on stdin, hands each stdout and stderr
line to a :class:`LineHandler`, and ends the whole process group on timeout, on cancellation or
when the handler asks to stop (SIGTERM, then SIGKILL after a grace period). No child outlives
its execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from corral.host import procs
from corral.models import ProcessIdentity

CHUNK_BYTES = 64 * 1024
MAX_LINE_BYTES = 8 * 1024 * 1024
PIPE_BYTES = 1024 * 1024


@dataclass(slots=True)
class Stop:
    """A handler's request to end the run early (e.g. the CLI is stuck retrying a 429)."""

    reason: str


class LineHandler(Protocol):
    def stdout_line(self, line: bytes) -> Stop | None: ...

    def stderr_line(self, line: bytes) -> Stop | None: ...


@dataclass(slots=True)
class ProcOutcome:
    exit_code: int | None
    timed_out: bool = False
    stopped: Stop | None = None
    start_error: str | None = None


def resolve_binary(binary: str, env: Mapping[str, str] | None = None) -> str | None:
    """The absolute path of ``binary`` (a name on PATH or a path), or None if not runnable."""
    if os.sep in binary:
        return binary if os.access(binary, os.X_OK) and Path(binary).is_file() else None
    path = (env or os.environ).get("PATH", os.defpath)
    return shutil.which(binary, path=path)


def kill_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _scrubber(secrets: Sequence[str]) -> Callable[[bytes], bytes]:
    """Replaces each secret (8+ characters) in a line with ``***``."""
    encoded = [s.encode() for s in secrets if len(s) >= 8]

    def clean(line: bytes) -> bytes:
        for secret in encoded:
            if secret in line:
                line = line.replace(secret, b"***")
        return line

    return clean


async def _pump(
    stream: asyncio.StreamReader,
    on_line: Callable[[bytes], Stop | None],
    on_overflow: Callable[[int], None],
    stop: Callable[[Stop], None],
) -> None:
    """Split a pipe into lines without ever holding more than ``MAX_LINE_BYTES`` of one."""
    pending = bytearray()
    dropping = 0
    while True:
        chunk = await stream.read(CHUNK_BYTES)
        if not chunk:
            break
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if dropping:
                on_overflow(dropping + nl - start)
                dropping = 0
            else:
                pending += chunk[start:nl]
                request = on_line(bytes(pending))
                if request is not None:
                    stop(request)
            pending.clear()
            start = nl + 1
        rest = chunk[start:]
        if dropping:
            dropping += len(rest)
        elif len(pending) + len(rest) > MAX_LINE_BYTES:
            dropping = len(pending) + len(rest)
            pending.clear()
        else:
            pending += rest
    if dropping:
        on_overflow(dropping)
    elif pending:
        request = on_line(bytes(pending))
        if request is not None:
            stop(request)


async def run_agent_process(
    argv: list[str],
    *,
    handler: LineHandler,
    stdin_data: bytes,
    cwd: Path | None,
    env: Mapping[str, str],
    stderr_file: BinaryIO,
    timeout_s: float | None,
    kill_grace_s: float = 5.0,
    on_process: Callable[[ProcessIdentity], Awaitable[None]] | None = None,
    secrets: Sequence[str] = (),
) -> ProcOutcome:
    """Run ``argv`` to completion (or timeout / stop / cancellation) and return how it ended.

    Every stderr line is appended to ``stderr_file`` before the handler sees it. Any of
    ``secrets`` the program prints is replaced by ``***`` before a line goes anywhere. From
    the moment the child exists, its whole group is ended before this returns or raises,
    whatever happens in between (a cancel while its process is being recorded included).
    """
    out_r, out_w = _big_pipe()
    err_r, err_w = _big_pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE,
            stdout=out_w,
            stderr=err_w,
            start_new_session=True,  # own process group: we can end it and all it spawned
        )
    except OSError as exc:
        os.close(out_r)
        os.close(err_r)
        return ProcOutcome(exit_code=None, start_error=f"cannot start {argv[0]}: {exc}")
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    pgid = proc.pid
    transports: list[asyncio.BaseTransport] = []
    try:
        pipes = []
        for fd in (out_r, err_r):
            reader, transport = await _reader(fd)
            pipes.append(reader)
            transports.append(transport)
        if on_process is not None:
            await on_process(procs.identify(pgid))
        return await _supervise(proc, pgid, handler, stdin_data, (pipes[0], pipes[1]),
                                stderr_file, timeout_s, kill_grace_s, _scrubber(secrets))
    finally:
        # Cancellation lands here too: the group is ended before CancelledError goes on.
        if proc.returncode is None:
            await asyncio.shield(_terminate(proc, pgid, kill_grace_s))
        kill_group(pgid, signal.SIGKILL)  # stragglers that left the leader behind
        for fd in (out_r, err_r)[len(transports):]:
            os.close(fd)  # a pipe whose reader never started
        for transport in transports:
            transport.close()


def _big_pipe() -> tuple[int, int]:
    """A pipe with a 1 MiB buffer (where the system allows it).

    Node-based CLIs exit without draining stdout: what does not fit the pipe's buffer at that
    moment is lost, so a 64 KiB default can cut off the final ``result`` line.
    """
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


async def _reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _supervise(
    proc: asyncio.subprocess.Process,
    pgid: int,
    handler: LineHandler,
    stdin_data: bytes,
    pipes: tuple[asyncio.StreamReader, asyncio.StreamReader],
    stderr_file: BinaryIO,
    timeout_s: float | None,
    kill_grace_s: float,
    clean: Callable[[bytes], bytes],
) -> ProcOutcome:
    stdout, stderr = pipes
    outcome = ProcOutcome(exit_code=None)
    stop_event = asyncio.Event()

    def request_stop(stop: Stop) -> None:
        if outcome.stopped is None:
            outcome.stopped = stop
        stop_event.set()

    def on_stdout(line: bytes) -> Stop | None:
        return handler.stdout_line(clean(line))

    def on_stderr(line: bytes) -> Stop | None:
        line = clean(line)
        stderr_file.write(line + b"\n")
        stderr_file.flush()
        return handler.stderr_line(line)

    def overflow(size: int) -> None:
        stderr_file.write(f"[corral: dropped an output line of {size} bytes]\n".encode())
        stderr_file.flush()

    pumps = [
        asyncio.create_task(_pump(stdout, on_stdout, overflow, request_stop)),
        asyncio.create_task(_pump(stderr, on_stderr, overflow, request_stop)),
    ]
    feeder = asyncio.create_task(_feed(proc, stdin_data))
    waiter = asyncio.create_task(proc.wait())
    stopper = asyncio.create_task(stop_event.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            outcome.timed_out = True
        if waiter not in done:
            await _terminate(proc, pgid, kill_grace_s)
    finally:
        if proc.returncode is None:
            await asyncio.shield(_terminate(proc, pgid, kill_grace_s))
        kill_group(pgid, signal.SIGKILL)  # before the pipes are drained: no writer is left
        waiter.cancel()
        stopper.cancel()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*pumps, return_exceptions=True), 5.0)
        for task in pumps:
            task.cancel()
    outcome.exit_code = proc.returncode
    return outcome


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.close()


async def _terminate(proc: asyncio.subprocess.Process, pgid: int, grace_s: float) -> None:
    kill_group(pgid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        kill_group(pgid, signal.SIGKILL)
        await proc.wait()
