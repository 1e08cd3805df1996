"""Small filesystem helpers: atomic writes for state that must survive a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


def write_atomic_sync(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Write temp, fsync, rename, fsync the directory: readers see the old or the new file, never half.

    durable=False skips both fsyncs, for files under daemon.state: they mean nothing after a reboot, and
    what a crashed shimd's successor (or a shim) reads after a SIGKILL the rename alone makes whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per write, not per process: two writes of one file at once (two threads) must not share it.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # Disk full mid-write: leave no half-written temp file taking space or confusing a reader.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """fsync a directory: a rename or a new entry in it survives a crash only after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir_sync(path: Path, group: int | None = None) -> None:
    """A directory holding a container's or an image's filesystem: no one but root may pass through it
    (setuid files and devices inside stay out of other users' reach). With group, that group may pass
    through too (0710): the host gid of a user-namespaced pod's root, which must reach its rootfs and pod
    files, and nothing more."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if group is not None:
        os.chown(path, 0, group)
    os.chmod(path, 0o710 if group is not None else 0o700)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


async def write_json(path: Path, obj: Any, durable: bool = True) -> None:
    await asyncio.to_thread(write_atomic_sync, path, json_bytes(obj), 0o600, durable)


async def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    await asyncio.to_thread(write_atomic_sync, path, text.encode(), mode)


def read_json_sync(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


async def remove_tree(path: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, path, True)


async def remove_file(path: Path) -> None:
    def _rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    await asyncio.to_thread(_rm)
