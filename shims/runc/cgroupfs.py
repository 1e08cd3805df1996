"""The host's cgroup mounts and cgroup removal, for the runc shim's own cgroup work (pause.py,
cgroup_lock.py, reaped_delete.py)."""

from __future__ import annotations

import errno
import os
import time

# runc retries a busy cgroup 5 times, 10 ms apart and doubling; an exiting task leaves it within the first.
BUSY_RETRIES = 4
BUSY_WAIT = 0.01


_mounts: list[tuple[str, str, set[str]]] = []


def mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, "cgroup" or "cgroup2", super options) of every cgroup mount, in mountinfo's order.

    Read once per shim, for all its users (the pause task, the cgroup lock, the reaped delete): the
    hierarchies are mounted at boot, and mountinfo lists every mount of the node, pods' included.
    """
    if not _mounts:
        found: list[tuple[str, str, set[str]]] = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = right.split()
                if fields and fields[0] in ("cgroup", "cgroup2"):
                    options = set(fields[2].split(",")) if len(fields) > 2 else set()
                    found.append((left.split()[4], fields[0], options))
        _mounts[:] = found
    return _mounts


def remove(paths: list[str]) -> list[str]:
    """Each cgroup with its sub-cgroups (blocking); the ones still there after the retries."""
    left = paths
    for attempt in range(BUSY_RETRIES + 1):
        if attempt:
            time.sleep(BUSY_WAIT * attempt)
        left = [p for p in left if not _remove_tree(p)]
        if not left:
            break
    return left


def _remove_tree(path: str) -> bool:
    """rmdir of a cgroup, after its sub-cgroups (a cgroup directory lists only control files besides)."""
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            return False
    try:
        with os.scandir(path) as entries:
            subs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not all([_remove_tree(s) for s in subs]):
        return False
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
