"""The local agent's tools: Claude Code's own names and input fields, confined to a workspace.

``Read``, ``Write``, ``Edit``, ``Bash``, ``Glob`` and ``Grep`` take the inputs Claude Code's tools
take, so the envelope of a local run reads like a claude run. Paths are relative to the
workspace or absolute inside it; a path that resolves outside it (``..``, an absolute path, a
symlink) is refused, as is anything inside ``.git``. ``Bash`` is the one place corral runs a
shell on purpose: the model's command, in the workspace, in its own process group, with an
environment holding none of the daemon's secrets, bounded in time and in output, inside
bubblewrap when the sandbox is on. Any failure is an answer to the model
(:class:`ToolOutcome` with ``is_error``), never an exception out of :meth:`Toolbox.run`.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.executor.proc import kill_group
from corral.host import sandbox

MAX_READ_LINES = 2000
MAX_LINE_CHARS = 2000
MAX_MATCHES = 200
_READ_BYTES = 64 * 1024


class _Input(BaseModel):
    # Models add fields of their own (claude's Bash takes a description): ignored, not refused.
    model_config = ConfigDict(extra="ignore", strict=True)


class ReadInput(_Input):
    """Read a file: numbered lines, from ``offset`` (1-based), at most ``limit`` lines."""

    file_path: str
    offset: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)


class WriteInput(_Input):
    """Write a file whole (made with its folders if missing)."""

    file_path: str
    content: str


class EditInput(_Input):
    """Replace ``old_string`` with ``new_string``: it must occur exactly once, else set
    ``replace_all``."""

    file_path: str
    old_string: str
    new_string: str
    replace_all: bool = False


class BashInput(_Input):
    """Run a bash command in the workspace; ``timeout`` in milliseconds."""

    command: str = Field(min_length=1)
    timeout: float | None = Field(default=None, gt=0)


class GlobInput(_Input):
    """Files matching a glob pattern (``**/*.py``), relative to the workspace or ``path``."""

    pattern: str = Field(min_length=1)
    path: str | None = None


class GrepInput(_Input):
    """Lines matching a regular expression, in the files under ``path`` (default: all)."""

    pattern: str = Field(min_length=1)
    path: str | None = None


INPUTS: dict[str, type[_Input]] = {
    "Read": ReadInput, "Write": WriteInput, "Edit": EditInput, "Bash": BashInput,
    "Glob": GlobInput, "Grep": GrepInput,
}


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    content: str
    is_error: bool = False
    malformed: bool = False  # an unknown tool or an input that does not fit it


class ToolRefused(Exception):
    """A call that cannot be done as asked; its message goes back to the model."""


@dataclass(frozen=True, slots=True)
class BashLimits:
    default_timeout_s: float = 120.0
    max_timeout_s: float = 600.0
    output_limit_chars: int = 10_000
    kill_grace_s: float = 2.0


def input_schemas() -> dict[str, dict[str, Any]]:
    """Each tool's input as a JSON schema (also what schema mode's actions are made of)."""
    out = {}
    for name, model in INPUTS.items():
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        out[name] = schema
    return out


def openai_tools() -> list[dict[str, Any]]:
    """The tools in OpenAI's ``tools`` format."""
    return [{"type": "function", "function": {
        "name": name, "description": (INPUTS[name].__doc__ or name).strip(),
        "parameters": schema}} for name, schema in input_schemas().items()]


class Toolbox:
    """The tools of one agent run, in ``workspace``."""

    def __init__(self, workspace: Path, *, limits: BashLimits | None = None,
                 sandbox_binary: str | None = None, env: dict[str, str] | None = None) -> None:
        self.workspace = workspace
        self.root = workspace.resolve()
        self.limits = limits or BashLimits()
        self.sandbox_binary = sandbox_binary
        # The model's commands see none of the daemon's environment: a PATH, a HOME of their
        # own, a locale. Never a key.
        self.env = env if env is not None else {
            "PATH": os.environ.get("PATH", os.defpath), "HOME": str(workspace),
            "LANG": "C.UTF-8", "TERM": "dumb"}

    async def run(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        model = INPUTS.get(name)
        if model is None:
            return ToolOutcome(f"unknown tool {name!r}; the tools are {', '.join(INPUTS)}",
                               is_error=True, malformed=True)
        try:
            parsed = model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}"
                for e in exc.errors())
            return ToolOutcome(f"invalid input for {name}: {problems}", is_error=True,
                               malformed=True)
        try:
            return await getattr(self, f"_{name.lower()}")(parsed)  # type: ignore[no-any-return]
        except ToolRefused as exc:
            return ToolOutcome(str(exc), is_error=True)
        except OSError as exc:
            return ToolOutcome(f"{name} failed: {exc.strerror or exc}", is_error=True)

    # -- paths ---------------------------------------------------------------------------------

    def inside(self, file_path: str) -> Path:
        """The path, resolved, if it is inside the workspace (symlinks followed); else refused."""
        path = Path(file_path)
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ToolRefused(f"{file_path} is outside the workspace {self.workspace}")
        if ".git" in resolved.relative_to(self.root).parts:
            raise ToolRefused(f"{file_path} is inside .git, which is git's own")
        return resolved

    def _shown(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path != self.root else "."

    # -- the tools -----------------------------------------------------------------------------

    async def _read(self, args: ReadInput) -> ToolOutcome:
        path = self.inside(args.file_path)
        text = await asyncio.to_thread(_read_text, path)
        lines = text.splitlines()
        start = (args.offset or 1) - 1
        chosen = lines[start:start + (args.limit or MAX_READ_LINES)]
        if not chosen:
            return ToolOutcome(f"{self._shown(path)} has {len(lines)} lines; none from line"
                               f" {start + 1}" if lines else f"{self._shown(path)} is empty")
        return ToolOutcome("\n".join(f"{n:6}\t{line[:MAX_LINE_CHARS]}"
                                     for n, line in enumerate(chosen, start=start + 1)))

    async def _write(self, args: WriteInput) -> ToolOutcome:
        path = self.inside(args.file_path)
        existed = await asyncio.to_thread(path.exists)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(args.content, encoding="utf-8")

        await asyncio.to_thread(write)
        verb = "updated" if existed else "created"
        return ToolOutcome(f"{verb} {self._shown(path)} ({len(args.content)} characters)")

    async def _edit(self, args: EditInput) -> ToolOutcome:
        path = self.inside(args.file_path)
        if args.old_string == args.new_string:
            raise ToolRefused("old_string and new_string are the same: nothing to change")
        text = await asyncio.to_thread(_read_text, path)
        count = text.count(args.old_string) if args.old_string else 0
        if count == 0:
            raise ToolRefused(f"old_string was not found in {self._shown(path)}"
                              + _closest(args.old_string, text))
        if count > 1 and not args.replace_all:
            raise ToolRefused(f"old_string occurs {count} times in {self._shown(path)}: give more"
                              " of the surrounding text to make it unique, or set replace_all")
        changed = text.replace(args.old_string, args.new_string,
                               -1 if args.replace_all else 1)
        await asyncio.to_thread(path.write_text, changed, encoding="utf-8")
        return ToolOutcome(f"edited {self._shown(path)}: {count if args.replace_all else 1}"
                           " replacement(s)")

    async def _glob(self, args: GlobInput) -> ToolOutcome:
        base = self.inside(args.path) if args.path else self.root

        def find() -> list[str]:
            found = []
            for match in base.glob(args.pattern):
                real = match.resolve()
                if real.is_relative_to(self.root) and ".git" not in match.relative_to(
                        base).parts and match.is_file():
                    found.append(self._shown(match))
                if len(found) >= MAX_MATCHES:
                    break
            return sorted(found)

        try:
            found = await asyncio.to_thread(find)
        except (ValueError, NotImplementedError) as exc:
            raise ToolRefused(f"bad glob pattern {args.pattern!r}: {exc}") from None
        return ToolOutcome("\n".join(found) if found else f"no files match {args.pattern}")

    async def _grep(self, args: GrepInput) -> ToolOutcome:
        try:
            regex = re.compile(args.pattern)
        except re.error as exc:
            raise ToolRefused(f"bad regular expression {args.pattern!r}: {exc}") from None
        base = self.inside(args.path) if args.path else self.root
        matches = await asyncio.to_thread(self._search, regex, base)
        return ToolOutcome("\n".join(matches) if matches else f"no match for {args.pattern}")

    def _search(self, regex: re.Pattern[str], base: Path) -> list[str]:
        files = [base]
        if not base.is_file():
            files = []
            for folder, dirs, names in os.walk(base):
                dirs[:] = sorted(d for d in dirs if d != ".git")
                files += [Path(folder, name) for name in sorted(names)]
        out: list[str] = []
        for path in files:
            try:
                text = _read_text(path)
            except (OSError, ToolRefused):
                continue
            for n, line in enumerate(text.splitlines(), start=1):
                if regex.search(line):
                    out.append(f"{self._shown(path)}:{n}:{line[:MAX_LINE_CHARS]}")
                    if len(out) >= MAX_MATCHES:
                        return out
        return out

    async def _bash(self, args: BashInput) -> ToolOutcome:
        limits = self.limits
        timeout_s = (min(args.timeout / 1000.0, limits.max_timeout_s) if args.timeout
                     else limits.default_timeout_s)
        argv = ["bash", "-c", args.command]
        if self.sandbox_binary is not None:
            argv = sandbox.wrap(argv, self.root, self.sandbox_binary)
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=self.root, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own group: it and all it started end together
        output = HeadTail(limits.output_limit_chars)
        timed_out = False
        try:
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(timeout_s):
                    while chunk := await proc.stdout.read(_READ_BYTES):
                        output.add(chunk)
                    await proc.wait()
            except TimeoutError:
                timed_out = True
        finally:
            if proc.returncode is None:  # timed out or cancelled: the whole group goes
                kill_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), limits.kill_grace_s)
                except TimeoutError:
                    kill_group(proc.pid, signal.SIGKILL)
                    await asyncio.shield(proc.wait())
            kill_group(proc.pid, signal.SIGKILL)  # what it left running in the background
        text = output.text()
        if timed_out:
            return ToolOutcome(f"{text}\n[the command ran past its timeout of {timeout_s:g}s"
                               " and was killed]".lstrip(), is_error=True)
        code = proc.returncode
        if code:
            return ToolOutcome(f"{text}\n[exit code {code}]".lstrip(), is_error=True)
        return ToolOutcome(text or "(no output)")


class HeadTail:
    """The first and last ``limit // 2`` characters of an output, with the count of the bytes
    left out between them; memory stays bounded however much a command prints."""

    def __init__(self, limit: int) -> None:
        self.half = max(limit // 2, 1)
        self.keep = self.half * 4  # bytes: a character is at most four of them
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.keep:
                del self.tail[:len(self.tail) - self.keep]

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if self.total == len(self.head) + len(self.tail) and len(head) + len(tail) <= 2 * self.half:
            return head + tail
        head, tail = head[:self.half], tail[-self.half:]
        left_out = self.total - len(head.encode()) - len(tail.encode())
        return f"{head}\n[... {left_out:,} bytes of output left out ...]\n{tail}"


def _read_text(path: Path) -> str:
    with path.open("rb") as fh:
        raw = fh.read(8 * 1024 * 1024 + 1)
    if len(raw) > 8 * 1024 * 1024:
        raise ToolRefused(f"{path.name} is over 8 MiB; read it in parts with Bash")
    if b"\0" in raw[:8192]:
        raise ToolRefused(f"{path.name} is a binary file")
    return raw.decode("utf-8", "replace")


def _closest(needle: str, text: str) -> str:
    lines = text.splitlines()
    first = next((line for line in needle.splitlines() if line.strip()), needle)
    close = difflib.get_close_matches(first, lines, n=3, cutoff=0.4)
    if not close:
        return ""
    numbered = [f"{lines.index(line) + 1}: {line}" for line in close]
    return "; the closest lines are:\n" + "\n".join(numbered)
