"""Running helper binaries (unshare, CNI plugins) as asyncio subprocesses with a hard timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shimd.errors import DeadlineExceeded, FailedPrecondition

# Daemons are often started with a PATH that lacks the sbin directories where ip/unshare live.
FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


def which(name: str) -> str:
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{FALLBACK_PATH}")
    if path is None:
        raise FailedPrecondition(f"required binary {name!r} not found in PATH or {FALLBACK_PATH}")
    return path


async def run(argv: Sequence[str], *, time_limit: float, stdin: bytes | None = None,
              env: Mapping[str, str] | None = None) -> Completed:
    """Run argv to completion; kill it (and reap it) on timeout or cancellation."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=time_limit)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Reap so no zombie is left; bounded, as the process was just SIGKILLed.
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), timeout=5)
        if isinstance(e, asyncio.TimeoutError):
            raise DeadlineExceeded(f"{os.path.basename(argv[0])} did not finish within {time_limit:g}s") from None
        raise
    assert proc.returncode is not None
    return Completed(list(argv), proc.returncode, out, err)
