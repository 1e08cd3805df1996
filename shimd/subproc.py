"""Short-lived helper processes (CNI plugins, unshare, mount): spawned with vfork, waited on with a pidfd.

Why not asyncio's subprocesses: under uvloop every spawn fork()s the whole daemon, copying the page
tables of its 60+ MiB and taking copy-on-write faults afterwards, and the event loop stands still
meanwhile: about 3 ms of CPU and 8 ms of wall time per spawn, several spawns per pod. CPython's
subprocess module spawns with vfork (about 0.25 ms) and closes every inherited descriptor. The exit
is observed through a pidfd on the event loop, so no SIGCHLD watcher takes part.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KILL_GRACE = 5.0  # a SIGKILLed helper is waited on this long; past it, it is reaped whenever it exits
_CHUNK = 65536


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(argv: Sequence[str], *, time_limit: float, stdin: bytes | None = None,
              env: Mapping[str, str] | None = None) -> Completed:
    """Run argv to completion, capturing stdout and stderr; raises TimeoutError (after killing and reaping
    it) when it takes longer than time_limit. Cancellation also kills it. A missing binary raises OSError."""
    # Popen returns once the child has exec'd: a vfork, shorter than asyncio's own spawn blocks the loop.
    proc = subprocess.Popen(  # noqa: ASYNC220
        list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(env) if env is not None else None)
    pidfd = -1
    handed_off = False
    try:
        pidfd = os.pidfd_open(proc.pid)
        async with asyncio.timeout(time_limit):
            _, out, err = await asyncio.gather(_feed(proc, stdin), _read_all(proc.stdout), _read_all(proc.stderr))
            await _wait_fd(pidfd)
        proc.poll()  # exited (the pidfd is readable): collects it at once
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if pidfd >= 0:
            with contextlib.suppress(BaseException):
                await wait_exit(pidfd, KILL_GRACE)
            if proc.poll() is None:
                # Stuck after SIGKILL (D state, a frozen cgroup): shimd is its parent and nobody else can
                # collect it, so its pidfd reaps it whenever it finally exits instead of leaving a zombie.
                _reap_later(proc, pidfd)
                handed_off = True
        raise
    finally:
        if pidfd >= 0 and not handed_off:
            os.close(pidfd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
    return Completed(list(argv), proc.returncode, out, err)


# Helpers still to be reaped, keyed by pidfd: their Popen objects stay referenced until then.
_stuck: dict[int, subprocess.Popen[bytes]] = {}


def _reap_later(proc: subprocess.Popen[bytes], pidfd: int) -> None:
    """No task waits on it: the event loop calls back once the pidfd turns readable (the process exited)."""
    loop = asyncio.get_running_loop()
    _stuck[pidfd] = proc

    def reap() -> None:
        if proc.poll() is None:
            return  # not yet collectable; the pidfd stays readable, so this runs again
        loop.remove_reader(pidfd)
        _stuck.pop(pidfd, None)
        os.close(pidfd)

    loop.add_reader(pidfd, reap)


def stuck_helpers() -> list[int]:
    """Pids of helpers killed but not exited yet (for logs and tests)."""
    return [p.pid for p in _stuck.values()]


async def wait_exit(pidfd: int, timeout: float) -> bool:
    """Whether the process of pidfd exited (whoever reaps it) within timeout."""
    try:
        async with asyncio.timeout(timeout):
            await _wait_fd(pidfd)
    except TimeoutError:
        return False
    return True


async def _wait_fd(fd: int, write: bool = False) -> None:
    """Until fd is readable (or writable); a pidfd turns readable when its process exits."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _read_all(pipe: object) -> bytes:
    fd = pipe.fileno()  # type: ignore[attr-defined]
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            await _wait_fd(fd)
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def _feed(proc: subprocess.Popen[bytes], data: bytes | None) -> None:
    if proc.stdin is None:
        return
    fd = proc.stdin.fileno()
    os.set_blocking(fd, False)
    view = memoryview(data or b"")
    try:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                await _wait_fd(fd, write=True)
            except BrokenPipeError:
                return  # it stopped reading; its exit status tells the rest
    finally:
        proc.stdin.close()
