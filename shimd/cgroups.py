"""cgroup paths for pods and containers under both cgroup drivers, and cleanup of what shimd made."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
# hierarchy_roots() is asked on every container exit and pod teardown; the hierarchies are mounted at boot,
# while mountinfo grows by several lines per pod (namespace pins, /dev/shm, rootfs), each line made by the
# kernel on every read: 90 us per call with no pod, 130 with 300 more mounts. A hierarchy mounted later
# is seen within this many seconds.
ROOTS_TTL = 30.0
_roots_cache: tuple[float, Path, list[Path]] | None = None


def container_path(driver: str, pod_parent: str, container_id: str) -> str:
    """The OCI linux.cgroupsPath for a container (runc's slice:prefix:name form under systemd)."""
    if driver == "systemd":
        return f"{pod_parent or 'system.slice'}:shimd:{container_id}"
    return f"{pod_parent.rstrip('/') or '/shimd'}/{container_id}"


def default_pod_parent(driver: str, pod_id: str) -> str:
    """Used when kubelet gives no cgroup_parent (crictl users): shimd then owns and removes it."""
    if driver == "systemd":
        return f"shimd-pod{pod_id[:16]}.slice"
    return f"/shimd/pod{pod_id[:16]}"


def _cgroup_mounts() -> list[tuple[str, Path, str]]:
    """(fstype, mount point, the text after " - ") of each cgroup and cgroup2 mount; none when unreadable."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return []
    mounts: list[tuple[str, Path, str]] = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fstype = right.split(" ", 1)[0]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((fstype, Path(left.split(" ")[4]), right))
    return mounts


def hierarchy_roots() -> list[Path]:
    """Mount points of every cgroup v1 hierarchy and of cgroup2 (hybrid hosts have both); see ROOTS_TTL."""
    global _roots_cache
    now = time.monotonic()
    cached = _roots_cache
    if cached is not None and cached[1] == MOUNTINFO and now - cached[0] < ROOTS_TTL:
        return list(cached[2])
    roots = _read_hierarchy_roots()
    _roots_cache = (now, MOUNTINFO, roots)
    return list(roots)


def _read_hierarchy_roots() -> list[Path]:
    roots: list[Path] = []
    for fstype, mount_point, right in _cgroup_mounts():
        if fstype == "cgroup" and "name=" in right and "name=systemd" not in right:
            continue
        roots.append(mount_point)
    return roots


def existing_dirs(rel: str) -> list[Path]:
    rel = rel.strip("/")
    return [root / rel for root in hierarchy_roots() if (root / rel).is_dir()]


def _remove_sync(rel: str) -> list[str]:
    """rmdir the cgroup (and empty children) in every hierarchy; returns what could not be removed."""
    left: list[str] = []
    for d in existing_dirs(rel):
        for sub, _dirs, _files in sorted(os.walk(d), key=lambda t: -len(t[0])):
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(sub)
    return left


async def remove(rel: str, attempts: int = 20) -> list[str]:
    """Processes can take a moment to leave a cgroup after they die; retry briefly."""
    left: list[str] = []
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(0.05)
        left = await asyncio.to_thread(_remove_sync, rel)
        if not left:
            return []
    return left


def systemd_slice_to_path(slice_name: str) -> str:
    """kubepods-besteffort-pod1.slice -> /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"""
    if not slice_name.endswith(".slice") or slice_name == "-.slice":
        return "/"
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    path = ""
    for i in range(1, len(parts) + 1):
        path += "/" + "-".join(parts[:i]) + ".slice"
    return path


def relative_path(driver: str, cgroups_path: str) -> str:
    """The path below each hierarchy's root of a container's cgroupsPath or of a pod's cgroup parent."""
    if driver == "systemd":
        if cgroups_path.endswith(".slice") and ":" not in cgroups_path:
            return systemd_slice_to_path(cgroups_path)  # a pod's parent slice
        with contextlib.suppress(ValueError):
            slice_name, _prefix, name = cgroups_path.split(":")
            return f"{systemd_slice_to_path(slice_name)}/shimd-{name}.scope"
    return cgroups_path


def oom_killed(rel: str) -> bool:
    """Whether the kernel OOM-killed a process in this cgroup (v1 memory.oom_control or v2 memory.events)."""
    for root in hierarchy_roots():
        for name, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
            p = root / rel.strip("/") / name
            try:
                for line in p.read_text().splitlines():
                    k, _, v = line.partition(" ")
                    if k == key and v.strip().isdigit() and int(v) > 0:
                        return True
            except OSError:
                continue
    return False


def hugetlb_usable() -> bool:
    """Whether runc can set hugepage limits here: a mounted cgroup v1 hugetlb hierarchy, or on a cgroup v2
    only host the hugetlb controller in the root's cgroup.controllers. (Hybrid hosts: runc uses v1.)"""
    mounts = _cgroup_mounts()
    v1_mounted = False
    for fstype, _, right in mounts:
        if fstype == "cgroup":
            v1_mounted = True
            if "hugetlb" in right.split(" ")[-1].split(","):
                return True
    if v1_mounted:
        return False
    for fstype, mount_point, _ in mounts:
        if fstype == "cgroup2":
            with contextlib.suppress(OSError):
                if "hugetlb" in (mount_point / "cgroup.controllers").read_text().split():
                    return True
    return False
