"""Shims no record names: started for a pod whose RunPodSandbox a crash of shimd cut short.

Such a shim is found by its name (zygote-forked shims are named `shim-<pod id prefix>`) or by its
command line (`-id <pod id>`, as every shim v2 binary is started), and only when its working directory
is the pod's own directory, so that a shim of another pod is never mistaken for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from shimd import subproc

REAP_TIMEOUT = 5.0


def find(pod_id: str, pod_dir: Path) -> list[int]:
    name, id_arg = f"shim-{pod_id[:10]}".encode(), b"-id\0" + pod_id.encode() + b"\0"
    root = str(pod_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if comm != name and id_arg not in cmdline:
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if cwd == root or cwd.startswith(root + "/"):
            found.append(int(entry))
    return found


async def kill(pod_id: str, pod_dir: Path) -> list[int]:
    """SIGKILL the pod's stray shims and wait until they are gone; returns their pids."""
    pids = await asyncio.to_thread(find, pod_id, pod_dir)
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except OSError:
            continue  # already gone
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fds[-1], signal.SIGKILL)
    try:
        await asyncio.gather(*(subproc.wait_exit(fd, REAP_TIMEOUT) for fd in fds))
    finally:
        for fd in fds:
            os.close(fd)
    return pids
