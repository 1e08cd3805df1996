"""The host's cgroup mounts, for the runc shim's own cgroup work (pause.py, cgroup_lock.py)."""

from __future__ import annotations


def mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, "cgroup" or "cgroup2", super options) of every cgroup mount, in mountinfo's order."""
    found: list[tuple[str, str, set[str]]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if fields and fields[0] in ("cgroup", "cgroup2"):
                options = set(fields[2].split(",")) if len(fields) > 2 else set()
                found.append((left.split()[4], fields[0], options))
    return found
