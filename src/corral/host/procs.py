"""Naming a process so that it cannot be mistaken for another one later (Linux: ``/proc``).

A crashed daemon leaves its agents' process groups recorded in the database. Before the next
daemon kills one, it must be sure the group is still the agent it started: a pid is reused,
above all after a reboot. A process is named by its pid, its start time in clock ticks since
boot (``/proc/<pid>/stat`` field 22) and the boot's id; only an exact match is the same process.
"""

from __future__ import annotations

from pathlib import Path

from corral.models import ProcessIdentity

_PROC = Path("/proc")


def boot_id() -> str | None:
    """This boot's random id, or None where the system does not say."""
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip() or None
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None when it does not exist."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])  # field 22 overall; the list starts at field 3
    except (IndexError, ValueError):
        return None


def identify(pid: int) -> ProcessIdentity:
    """The identity of a process group leader that this daemon just started."""
    return ProcessIdentity(pgid=pid, started=start_ticks(pid), boot_id=boot_id())


def is_alive_and_same(recorded: ProcessIdentity) -> bool:
    """True only when the recorded leader still runs: same pid, start time and boot."""
    if recorded.started is None or recorded.boot_id is None:
        return False
    if boot_id() != recorded.boot_id:
        return False
    return start_ticks(recorded.pgid) == recorded.started
