"""Mount helpers: tmpfs mounts and unmounts are syscalls (in a worker thread), other mounts run
mount(8) through shimd.subproc, never through a shell."""

from __future__ import annotations

import asyncio
import ctypes
import errno
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


_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
# mount(8)'s names of the flags a tmpfs mount takes as flags, not as data.
_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "noatime": 0x400}
_libc = ctypes.CDLL(None, use_errno=True)


def mount_tmpfs_sync(path: Path, options: str, source: str = "shm") -> None:
    path.mkdir(parents=True, exist_ok=True)
    flags, data = 0, []
    for opt in options.split(","):
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt:
            data.append(opt)
    if _libc.mount(source.encode(), os.fsencode(path), b"tmpfs", ctypes.c_ulong(flags), ",".join(data).encode()) != 0:
        e = ctypes.get_errno()
        raise errors.ShimdError(f"mount -t tmpfs -o {options} {source} {path} failed: {os.strerror(e)}")


async def mount_tmpfs(path: Path, options: str) -> None:
    # A syscall rather than mount(8): one helper process less on the pod start path.
    await asyncio.to_thread(mount_tmpfs_sync, path, options)


def unmount_sync(path: Path) -> None:
    """Lazy unmount of every mount stacked on path; a path that is no mount point (or none) is fine."""
    target = os.fsencode(path)
    for _ in range(64):  # a bound, not an expected depth: each round removes one stacked mount
        if _libc.umount2(target, _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            if e in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):  # not (or no longer) a mount point
                return
            raise errors.ShimdError(f"umount -l {path} failed: {os.strerror(e)}")
    raise errors.ShimdError(f"umount -l {path}: still a mount point after 64 unmounts")


async def unmount(path: Path) -> None:
    """Lazy unmount of every mount stacked on path; a path that is no mount point is fine."""
    # umount2 directly: umount(8) cost a process spawn plus a mountinfo read per call.
    await asyncio.to_thread(unmount_sync, path)


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


def _holding_mount(path: str) -> tuple[str, list[str], str]:
    """(mount point, mountinfo's optional fields, filesystem type) of the visible mount that holds path,
    symlinks resolved (path itself need not exist)."""
    real = os.path.realpath(path)
    best, optional, fstype = "", [], ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split(" ")
            point = _unescape(fields[4])
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):  # the last of stacked mounts is the visible one
                best, optional, fstype = point, fields[6:], right.split(" ", 1)[0]
    return best, optional, fstype


def propagation_sync(path: str) -> tuple[str, set[str]]:
    """(mount point, propagation tags) of the mount that holds path, symlinks resolved.

    The tags are mountinfo's optional fields without their peer group ids: "shared", "master",
    "propagate_from", "unbindable"; none of them means private.
    """
    point, optional, _ = _holding_mount(path)
    return point, {opt.partition(":")[0] for opt in optional}


def filesystem_type_sync(path: str | Path) -> str:
    """The type of the filesystem that holds path ("tmpfs", "ext4"...; path itself need not exist)."""
    return _holding_mount(str(path))[2]


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
