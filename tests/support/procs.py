"""Finding a pod's processes: shims started directly name their pod on their command line; shims forked
by the zygote share its command line and carry `shim-<first 10 chars of the pod id>` as their name.
Also how the tests stop the daemons they start."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def terminate(proc: subprocess.Popen[Any], grace: float, kill_wait: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited after `grace` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=kill_wait)


def _read(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _zombie(pid: str) -> bool:
    """An exited process whose parent has not collected it yet. Orphaned shims belong to PID 1, and some
    sandboxes' PID 1 (this machine's included) never reaps: such an entry is dead, not leaked."""
    stat = _read(pid, "stat")
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"Z"


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie counts as gone)."""
    try:
        return not _zombie(str(pid))
    except OSError:
        return False


def procs_for_pod(pod_id: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline, comm = _read(pid, "cmdline"), _read(pid, "comm").strip()
            if _zombie(pid):
                continue
        except OSError:
            continue
        if pod_id.encode() in cmdline or comm == f"shim-{pod_id[:10]}".encode():
            found.append(int(pid))
    return found


def shim_pids(pod_id: str) -> list[int]:
    out = []
    for pid in procs_for_pod(pod_id):
        try:
            cmdline, comm = _read(str(pid), "cmdline"), _read(str(pid), "comm").strip()
        except OSError:
            continue
        if comm.startswith(b"shim-") or b"shims.runc.shim" in cmdline or b"shimd-runc-shim" in cmdline:
            out.append(pid)
    return out
