"""Mount helpers (mount(8)/umount(8) run through shimd.subproc, never through a shell)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shimd import errors, subproc
from shims.common import idmap


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
