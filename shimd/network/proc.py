"""Running helper binaries (unshare, CNI plugins) with a hard timeout (spawned as shimd.subproc does)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

from shimd import subproc
from shimd.errors import DeadlineExceeded, FailedPrecondition
from shimd.subproc import Completed

__all__ = ["FALLBACK_PATH", "Completed", "run", "which"]

# Daemons are often started with a PATH that lacks the sbin directories where ip/unshare live.
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(name: str) -> str:
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{FALLBACK_PATH}")
    if path is None:
        raise FailedPrecondition(f"required binary {name!r} not found in PATH or {FALLBACK_PATH}")
    return path


async def run(argv: Sequence[str], *, time_limit: float, stdin: bytes | None = None,
              env: Mapping[str, str] | None = None) -> Completed:
    """Run argv to completion; kill it (and reap it) on timeout or cancellation."""
    try:
        return await subproc.run(argv, time_limit=time_limit, stdin=stdin, env=env)
    except TimeoutError:
        raise DeadlineExceeded(f"{os.path.basename(argv[0])} did not finish within {time_limit:g}s") from None
