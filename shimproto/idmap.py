"""Idmapped mounts (mount_setattr MOUNT_ATTR_IDMAP) through the new mount API, by raw syscalls.

A detached clone of a directory is idmapped with a user namespace: files owned by host uid 0 then
appear owned by the host uid that container root maps to. overlayfs itself cannot be idmapped, but
it accepts idmapped lower layers (as containerd 2 uses them), named by /proc/self/fd paths; the
overlay keeps its own references to them, so closing the fds leaves no mount behind.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

# x86_64 and aarch64 share the numbers of these (recent, unified) syscalls.
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_MOUNT_ATTR_IDMAP = 0x00100000
_SUPPORTED_ARCHES = ("x86_64", "aarch64")

# The mount option shimd adds to a rootfs overlay (value: a pinned user namespace) and the shim acts on.
USERNS_MOUNT_OPTION = "X-shimd.idmap-userns="

_libc: ctypes.CDLL | None = None


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(*args: object) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    ret = int(_libc.syscall(*args))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def idmapped_clone(path: str, userns_fd: int) -> int:
    """An fd of a detached, idmapped clone of the mount tree at path (the caller closes it)."""
    machine = os.uname().machine  # not platform.machine(): the shim keeps its imports small
    if machine not in _SUPPORTED_ARCHES:
        raise OSError(f"idmapped mounts are not implemented for {machine}")
    try:
        fd = _syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path),
                      _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE)
    except OSError as e:
        raise OSError(e.errno, f"open_tree {path}: {e.strerror}") from None
    attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    try:
        _syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
                 ctypes.sizeof(attr))
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"idmapping {path} (mount_setattr): {e.strerror}; its filesystem may not "
                               "support idmapped mounts") from None
    return fd


def open_userns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"opening the user namespace {path}: {e.strerror}") from None


def check(paths: Iterable[str], userns_path: str) -> None:
    """Raise OSError naming the first path that cannot be idmapped with that user namespace."""
    ns_fd = open_userns(userns_path)
    try:
        for path in paths:
            os.close(idmapped_clone(path, ns_fd))
    finally:
        os.close(ns_fd)
