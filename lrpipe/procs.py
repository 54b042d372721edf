"""Which process writes a run, and whether it still lives.

Every run carries the host, the pid and the pid's start time of the process writing it. The
start time (field 22 of ``/proc/<pid>/stat``, clock ticks after boot) makes the pair name one
process even after the kernel reuses the pid number, so a later flow can tell a run whose
writer died (SIGKILL, power loss) from one a live process is still writing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

HOST_TAG, PID_TAG, PID_STARTED_TAG = "host", "pid", "pid_started"


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state first); [] where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text.rsplit(")", 1)[1].split()


def pid_started(pid: int) -> str:
    """When process ``pid`` started, in clock ticks after boot; "" where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def process_tags() -> dict[str, str]:
    """Tags naming the process that writes a run: host, pid and the pid's start time."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_STARTED_TAG: pid_started(pid)}


def process_alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` (started at ``started``, if known) still runs on this host.
    A zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":
        return False
    return not started or not fields or pid_started(pid) == started


def writer_is_dead(tags: dict[str, str]) -> bool:
    """Whether the run tagged ``tags`` was written by a process of this host that died.
    Runs without process tags or from other hosts are never judged dead."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    return not process_alive(int(pid), tags.get(PID_STARTED_TAG, ""))
