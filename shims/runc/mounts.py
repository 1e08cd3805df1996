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
            options, cwd = _shorten_lowerdirs(list(mnt["options"])) if mnt["type"] == "overlay" else (
                list(mnt["options"]), "")
            # The kernel reads relative lowerdirs from the mounting process's cwd (env -C, no shell).
            argv = ["env", "-C", cwd, "mount"] if cwd else ["mount"]
            argv += ["-t", mnt["type"] or "none"]
            if options:
                argv += ["-o", ",".join(options)]
            argv += [mnt["source"] or "none", target]
            await run(reaper, argv, timeout)
            done.append(target)
    except CommandError as e:
        for target in reversed(done):
            unmount(target)
        raise OSError(f"mounting the rootfs at {rootfs} failed: {e.stderr.strip()}") from None


# Mount options must fit one page; long absolute lowerdir lists (many layers) do not.
OPTIONS_BUDGET = 3500


def _shorten_lowerdirs(options: list[str]) -> tuple[list[str], str]:
    """Relative lowerdirs under their common parent when the absolute list would not fit."""
    if len(",".join(options)) <= OPTIONS_BUDGET:
        return options, ""
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx < 0:
        return options, ""
    lowers = options[idx][len("lowerdir="):].split(":")
    if len(lowers) < 2 or not all(os.path.isabs(p) for p in lowers):
        return options, ""
    common = os.path.commonpath(lowers)
    out = list(options)
    out[idx] = "lowerdir=" + ":".join(os.path.relpath(p, common) for p in lowers)
    return out, common


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
