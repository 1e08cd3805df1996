"""`runc kill --all` of a container that shares a PID namespace, done without a runc process.

Without a PID namespace of its own a container's processes do not die with its init, so a stop
signals every process in the container's cgroup. runc does it by freezing the cgroup (no process can
fork, exit or be replaced by a new one with a recycled pid while it reads the list), reading every
pid in it and its sub-cgroups, signalling each, and thawing. That is a Go start-up of 6-7 ms of CPU and
wall on this machine on every StopContainer and pod stop of such a container; the same steps here take
well under a millisecond.

Taken only for runc itself with its cgroupfs driver and its own state layout, on a cgroup v1 freezer
(the hybrid layout this project runs on); a cgroup v2 freezer, a freezer that does not report FROZEN in
time, or anything unexpected in runc's state returns the reason, and the caller runs `runc kill --all`:
runc stays the reference for every case this does not cover. tests/integration/test_runc_shim.py
checks that every process of such a container dies and that runc was not run.
"""

from __future__ import annotations

import os
import time

from shims.runc import cgroupfs, runc_state

FREEZE_TIME_LIMIT = 1.0  # runc gives up on a freezer after about as long
FREEZE_POLL = 0.0005

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from collections.abc import Iterator


def signal_all(root: str, cid: str, sig: int) -> str:
    """Signals every process of the container's cgroup (blocking); "" when done, else why runc must."""
    paths, why = runc_state.cgroup_paths(root, cid)
    if why:
        return why
    freezer = paths.get("freezer", "")
    if not any(freezer.startswith(point + "/") and kind == "cgroup" and "freezer" in options
               for point, kind, options in cgroupfs.mounts()):
        return f"freezer cgroup {freezer!r} is not under a cgroup v1 freezer mount"
    state = os.path.join(freezer, "freezer.state")
    try:
        with open(state, "rb") as f:
            if f.read().strip() != b"THAWED":
                return "its freezer is not thawed (paused, or being paused)"
    except OSError as e:
        return f"freezer state unreadable: {e}"
    try:
        why = _freeze(state)
        if not why:
            for pid in _pids(freezer):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    except OSError as e:
        why = f"freezer: {e}"
    finally:
        try:
            _write(state, b"THAWED")
        except OSError as e:
            why = why or f"thawing failed: {e}"
    return why


def _freeze(state: str) -> str:
    """FROZEN written until the freezer reports it (the kernel answers FREEZING while tasks settle)."""
    deadline = time.monotonic() + FREEZE_TIME_LIMIT
    while True:
        _write(state, b"FROZEN")
        with open(state, "rb") as f:
            if f.read().strip() == b"FROZEN":
                return ""
        if time.monotonic() > deadline:
            return f"freezer did not report FROZEN within {FREEZE_TIME_LIMIT:g}s"
        time.sleep(FREEZE_POLL)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _pids(cgroup: str) -> Iterator[int]:
    """Every pid in the cgroup and its sub-cgroups (a frozen parent freezes them all)."""
    for directory, _, _ in os.walk(cgroup):
        try:
            with open(os.path.join(directory, "cgroup.procs"), "rb") as f:
                listed = f.read().split()
        except FileNotFoundError:
            continue
        yield from (int(p) for p in listed)
