"""daemon.state on a tmpfs, as /run is on a standard host.

Every pod makes and removes some 30 files and directories there (bundles, namespace pins, pod files,
shim sockets, runc's state). Where /run is a disk filesystem the allocator does work for each: on the
CI machine (ext4 without a journal, one filesystem for everything) a file creation scans past every
inode freed in the last 30 s, and 20 pods started at once spent ~40 ms of CPU per pod in it
(`perf record -a` during tests/bench/bench_pod_start: find_inode_bit/recently_deleted under mkdir and
openat; the same run with its work directory on tmpfs: 122 -> 83 ms of machine CPU per pod).

The state is lost on reboot by definition, so shimd mounts a tmpfs there when the directory is empty
and on another filesystem. A directory already holding state (a shimd that ran without this) is left as
it is: a mount over it would hide its pods from recovery.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from shimd import mounts

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
TMPFS_OPTIONS = "nosuid,nodev,mode=0711"
TMPFS_SOURCE = "shimd-state"
LOCK_TIMEOUT = 10.0


def prepare_sync(state: Path) -> str:
    """Makes the state directory and, where it is an empty directory on disk, mounts a tmpfs on it.

    Returns what was found: "tmpfs" (already in memory), "mounted", or "kept: <why>". Serialized with
    an flock on the directory itself, so two daemons started at once never stack two mounts.
    """
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        kind = mounts.filesystem_type_sync(state)
        if kind in MEMORY_FILESYSTEMS:
            return "tmpfs"
        with os.scandir(state) as entries:
            if next(entries, None) is not None:
                return f"kept: it already holds state on {kind or 'an unknown filesystem'}"
        mounts.mount_tmpfs_sync(state, TMPFS_OPTIONS, source=TMPFS_SOURCE)
        return "mounted"
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
