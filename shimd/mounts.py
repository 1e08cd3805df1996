"""Mount helpers (mount(8)/umount(8) run through shimd.subproc, never through a shell)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from shimd import errors, subproc
from shimproto import idmap


async def run(*argv: str, timeout: float = 30.0) -> None:
    try:
        done = await subproc.run(argv, time_limit=timeout)
    except TimeoutError:
        raise errors.DeadlineExceeded(f"{argv[0]} timed out after {timeout}s") from None
    if done.returncode != 0:
        raise errors.ShimdError(f"{' '.join(argv)} failed: {done.stderr.decode(errors='replace').strip()}")


def is_mount_sync(path: Path) -> bool:
    target = str(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split(" ")[4] == target for line in f)
    except OSError:
        return False


async def mount_tmpfs(path: Path, options: str) -> None:
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    await run("mount", "-t", "tmpfs", "-o", options, "shm", str(path))


async def unmount(path: Path) -> None:
    """Lazy unmount of every mount stacked on path; a path that is no mount point is fine."""
    while await asyncio.to_thread(is_mount_sync, path):
        await run("umount", "-l", str(path))


async def check_idmap(paths: list[str], userns_path: str) -> None:
    """Fail early (CreateContainer) when the layers cannot be idmapped, not with wrong ownership later."""
    try:
        await asyncio.to_thread(idmap.check, paths, userns_path)
    except OSError as e:
        raise errors.FailedPrecondition(f"the image layers cannot be idmapped for the pod's user namespace: "
                                        f"{e.strerror or e}") from None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def propagation_sync(path: str) -> tuple[str, set[str]]:
    """(mount point, propagation tags) of the mount that holds path, symlinks resolved.

    The tags are mountinfo's optional fields without their peer group ids: "shared", "master",
    "propagate_from", "unbindable"; none of them means private.
    """
    real = os.path.realpath(path)
    best = ""
    tags: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left = line.partition(" - ")[0].split(" ")
            point = _unescape(left[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):  # the last of stacked mounts is the visible one
                best, tags = point, {opt.partition(":")[0] for opt in left[6:]}
    return best, tags


def check_propagation_sync(host_mounts: list[tuple[int, str, int]]) -> None:
    """Each (index, host path, CRI propagation) can propagate as asked: as containerd and CRI-O do, a
    Bidirectional volume needs its host mount shared and a HostToContainer one shared or a slave,
    otherwise the mode would silently be private. shimd does not change the host's mounts itself."""
    for i, host_path, mode in host_mounts:
        if mode == 0:
            continue
        try:
            point, tags = propagation_sync(host_path)
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            raise errors.InvalidArgument(f"mounts[{i}].host_path {host_path!r}: "
                                         f"{getattr(e, 'strerror', None) or e}") from None
        if mode == 2 and "shared" not in tags:
            raise errors.FailedPrecondition(
                f"mounts[{i}].propagation is BIDIRECTIONAL but {host_path!r} is on mount {point!r}, which is not "
                "a shared mount (make it shared, e.g. mount --make-rshared)")
        if mode == 1 and not tags & {"shared", "master"}:
            raise errors.FailedPrecondition(
                f"mounts[{i}].propagation is HOST_TO_CONTAINER but {host_path!r} is on mount {point!r}, which is "
                "neither shared nor a slave (make it shared, e.g. mount --make-rshared)")
