"""Rootfs mounts of a task: mounted by the shim at <bundle>/rootfs on Create, unmounted on Delete."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from shims.common.procs import CommandError, Reaper, run

MNT_DETACH = 2
_libc: Any = None


def _umount2(target: str, flags: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(target.encode(), flags) != 0:
        return ctypes.get_errno()
    return 0


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            want = path.encode()
            return any(line.split(b" ")[4] == want for line in f)
    except OSError:
        return False


async def mount_all(reaper: Reaper, mounts: list[dict[str, Any]], rootfs: str, timeout: float) -> None:
    """Mount each entry onto rootfs (+ its target); on failure undo what was mounted and raise."""
    os.makedirs(rootfs, mode=0o755, exist_ok=True)
    done: list[str] = []
    try:
        for mnt in mounts:
            target = os.path.join(rootfs, mnt["target"].lstrip("/")) if mnt["target"] else rootfs
            argv = ["mount", "-t", mnt["type"] or "none"]
            if mnt["options"]:
                argv += ["-o", ",".join(mnt["options"])]
            argv += [mnt["source"] or "none", target]
            await run(reaper, argv, timeout)
            done.append(target)
    except CommandError as e:
        for target in reversed(done):
            unmount(target)
        raise OSError(f"mounting the rootfs at {rootfs} failed: {e.stderr.strip()}") from None


def unmount(target: str) -> None:
    """Unmount everything stacked at target; lazily if it is busy."""
    for _ in range(32):
        if not is_mountpoint(target):
            return
        err = _umount2(target, 0)
        if err == 16:  # EBUSY
            err = _umount2(target, MNT_DETACH)
        if err not in (0, 22):  # EINVAL: not a mount point any more
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")
