"""Is a process of this host still the one we knew? Its pid, and its start time so a reused pid is told
apart (Linux /proc; elsewhere only whether the pid runs). Light: no torch, nothing of the ledger, so the
CLI can ask before any command imports them.
"""

from __future__ import annotations

import os


def _stat(pid: int) -> list[bytes] | None:
    """Fields 3 on of /proc/<pid>/stat (state, ppid, ...), or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # the name before ")" may hold spaces
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), so a reused pid is told from the
    original; None where /proc cannot say (another OS, or no such process)."""
    stat = _stat(pid)
    return int(stat[19]) if stat else None  # field 22


def process_gone(pid: int, started: int | None) -> bool:
    """True when process ``pid`` of this host no longer runs (or is a zombie), or its pid now belongs to a
    later process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it runs, as another user
        pass
    stat = _stat(pid)
    if stat is None:
        return False
    return stat[0] == b"Z" or started is not None and int(stat[19]) != started
