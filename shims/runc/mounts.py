"""Rootfs mounts of a task: mounted by the shim at <bundle>/rootfs on Create, unmounted on Delete.

An overlay with the option `X-shimd.idmap-userns=<pinned user namespace>` (a pod with hostUsers:
false) is mounted on idmapped lower layers, so that the image appears owned by the container's root.
"""

from __future__ import annotations

import ctypes
import os

from shimproto import idmap
from shims.common import aio
from shims.common.procs import CommandError, Reaper, run

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
IDMAP_OPTION = idmap.USERNS_MOUNT_OPTION
_libc: Any = None


def _umount2(target: str, flags: int) -> int:
    if _libc_handle().umount2(target.encode(), flags) != 0:
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
            options, userns = _split_idmap(list(mnt["options"]))
            if userns:
                await aio.to_thread(mount_idmapped_overlay, mnt["type"], options, target, userns)
            else:
                await _mount(reaper, mnt, options, target, timeout)
            done.append(target)
    except (CommandError, OSError) as e:
        for target in reversed(done):
            unmount(target)
        why = e.stderr.strip() if isinstance(e, CommandError) else str(e)
        raise OSError(f"mounting the rootfs at {rootfs} failed: {why}") from None


# mount(8)'s names of the flags an overlay mount takes as mount(2) flags rather than as data.
_FLAGS = {"ro": 0x1, "nosuid": 0x2, "nodev": 0x4, "noexec": 0x8, "sync": 0x10, "dirsync": 0x80,
          "noatime": 0x400, "nodiratime": 0x800, "relatime": 0x200000, "strictatime": 0x1000000}


def _overlay_syscall_args(options: list[str]) -> tuple[int, str] | None:
    """(flags, data) for mount(2), or None when only mount(8) knows what an option means."""
    flags, data = 0, []
    for o in options:
        if o in _FLAGS:
            flags |= _FLAGS[o]
        elif o in ("rw", "defaults") or o.lower().startswith("x-"):  # mount(8) drops these too
            continue
        elif "=" in o or o.isidentifier():
            data.append(o)
        else:
            return None
    return flags, ",".join(data)


async def _mount(reaper: Reaper, mnt: dict[str, Any], options: list[str], target: str, timeout: float) -> None:
    options, cwd = _shorten_lowerdirs(options) if mnt["type"] == "overlay" else (options, "")
    direct = _overlay_syscall_args(options) if mnt["type"] == "overlay" and not cwd else None
    if direct is not None:
        # mount(2) itself: a container's rootfs is on StartContainer's path, and mount(8) is a fork+exec.
        await aio.to_thread(_mount_syscall, mnt["source"] or "overlay", target, "overlay", direct[1], direct[0])
        return
    # The kernel reads relative lowerdirs from the mounting process's cwd (env -C, no shell).
    argv = ["env", "-C", cwd, "mount"] if cwd else ["mount"]
    argv += ["-t", mnt["type"] or "none"]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [mnt["source"] or "none", target]
    await run(reaper, argv, timeout)


def _split_idmap(options: list[str]) -> tuple[list[str], str]:
    """(options for the kernel, the user namespace to idmap with or "")."""
    userns = [o[len(IDMAP_OPTION):] for o in options if o.startswith(IDMAP_OPTION)]
    return [o for o in options if not o.startswith(IDMAP_OPTION)], (userns[-1] if userns else "")


def mount_idmapped_overlay(fstype: str, options: list[str], target: str, userns_path: str) -> None:
    """overlayfs cannot be idmapped itself (EINVAL), so its lower layers are: each becomes a detached
    idmapped clone named by /proc/self/fd/N, which also keeps the option string short."""
    lowers = next((o[len("lowerdir="):].split(":") for o in options if o.startswith("lowerdir=")), None)
    if fstype != "overlay" or not lowers:
        raise OSError(f"{IDMAP_OPTION} applies to overlay mounts with a lowerdir, not {fstype!r}")
    ns_fd = idmap.open_userns(userns_path)
    fds: list[int] = []
    try:
        for layer in lowers:
            fds.append(idmap.idmapped_clone(layer, ns_fd))
        lowerdir = "lowerdir=" + ":".join(f"/proc/self/fd/{fd}" for fd in fds)
        data = ",".join([lowerdir if o.startswith("lowerdir=") else o for o in options])
        _mount_syscall("overlay", target, "overlay", data)
    finally:
        for fd in [*fds, ns_fd]:
            os.close(fd)


def _libc_handle() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _mount_syscall(source: str, target: str, fstype: str, data: str, flags: int = 0) -> None:
    if _libc_handle().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                            data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


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
    # umount2 until it says "not a mount point": reading mountinfo first would cost a read of every
    # mount of the node per layer (thousands of lines with hundreds of pods).
    for _ in range(32):
        err = _umount2(target, UMOUNT_NOFOLLOW)
        if err == 16:  # EBUSY
            err = _umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW)
        if err in (22, 2, 20):  # EINVAL: not (or no longer) a mount point; ENOENT, ENOTDIR: no such path
            return
        if err:
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")
