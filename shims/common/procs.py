"""Every child of a shim is spawned and reaped here.

The shim is a child subreaper, so container inits and detached exec processes are reparented to it
when runc exits. A single SIGCHLD handler calls waitpid(-1) and hands each status to whoever waits
for that pid; statuses nobody asked for yet (an init that died before its pid file was read) are
kept for a while. Nothing else in the shim waits for children (it runs on aio.py, not asyncio,
whose child watchers would race with waitpid(-1)).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Sequence

from shims.common import aio

PR_SET_CHILD_SUBREAPER = 36
_UNCLAIMED_MAX = 1024

ExitInfo = tuple[int, int]  # (exit status as containerd reports it, exit time in ns since the epoch)


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def trim_memory() -> None:
    """Hand freed heap back to the kernel (start-up and deleted tasks leave ~1 MB of free pages)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as shells and containerd report


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, aio.Future[ExitInfo]] = {}
        self._unclaimed: OrderedDict[int, ExitInfo] = OrderedDict()
        self._loop: aio.Loop | None = None

    def install(self) -> None:
        self._loop = aio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = (exit_status(status), time.time_ns())
            fut = self._waiters.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(info)
            else:
                self._unclaimed[pid] = info
                while len(self._unclaimed) > _UNCLAIMED_MAX:
                    self._unclaimed.popitem(last=False)

    def holds(self, pid: int) -> bool:
        """Whether pid is a watched child not reaped yet: until it is, no other process can take its pid."""
        fut = self._waiters.get(pid)
        return fut is not None and not fut.done()

    def watch(self, pid: int) -> aio.Future[ExitInfo]:
        """A future resolved with the pid's exit; call right after the pid is known."""
        loop = aio.get_running_loop()
        fut = self._waiters.get(pid)
        if fut is not None:
            return fut
        fut = loop.create_future()
        info = self._unclaimed.pop(pid, None)
        if info is not None:
            fut.set_result(info)
        else:
            self._waiters[pid] = fut
        return fut

    def spawn(self, argv: Sequence[str], stdin: int, stdout: int, stderr: int, env: dict[str, str] | None = None,
              setsid: bool = False) -> tuple[int, aio.Future[ExitInfo]]:
        actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                   (os.POSIX_SPAWN_DUP2, stderr, 2)]
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, so reset them for runc and,
        # through it, for the container's processes.
        pid = os.posix_spawnp(argv[0], list(argv), os.environ if env is None else env, file_actions=actions,
                              setsid=setsid, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        return pid, self.watch(pid)


async def _read_all(fd: int, limit: int) -> bytes:
    """Read a non-blocking pipe to EOF without blocking the loop; output past `limit` is dropped."""
    loop = aio.get_running_loop()
    chunks: list[bytes] = []
    size = 0
    done: aio.Future[None] = loop.create_future()

    def readable() -> None:
        nonlocal size
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            if size < limit:
                chunks.append(data[: limit - size])
                size += len(chunks[-1])

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks)


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], status: int, stderr: str) -> None:
        super().__init__(f"{os.path.basename(argv[0])} {argv[-1] if len(argv) > 1 else ''} failed "
                         f"(exit {status}): {stderr.strip() or 'no error output'}")
        self.status, self.stderr = status, stderr


class CommandTimeout(Exception):
    pass


async def run(reaper: Reaper, argv: Sequence[str], timeout: float, stdin_data: bytes | None = None,
              stdio: tuple[int, int, int] | None = None, limit: int = 1 << 20, check: bool = True,
              ) -> tuple[int, bytes, bytes]:
    """Run a command (never through a shell), bounded by `timeout`; killed with SIGKILL when late.

    `stdio` passes given descriptors instead of capture pipes (runc create/exec hand them to the
    container); in that case stdout/stderr come back empty.
    """
    to_close: list[int] = []
    readers: list[int] = []
    try:
        if stdio is not None:
            fds = stdio
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin_data is not None else (os.open(os.devnull, os.O_RDONLY |
                                                                                         os.O_CLOEXEC), -1)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            to_close += [in_r, out_w, err_w]
            readers = [out_r, err_r]
            fds = (in_r, out_w, err_w)
        pid, exited = reaper.spawn(argv, *fds)
    except BaseException:
        for fd in to_close + readers:
            os.close(fd)
        raise
    for fd in to_close:
        os.close(fd)
    async def feed() -> None:
        if stdin_data is None or stdio is not None:
            return
        try:
            await _write_all(in_w, stdin_data)
        finally:
            os.close(in_w)
    try:
        async with aio.timeout(timeout):
            results = await aio.gather(feed(), *(_read_all(fd, limit) for fd in readers))
            status, _ = await exited
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with aio.timeout(5.0):
                await exited
        raise CommandTimeout(f"{os.path.basename(argv[0])} {' '.join(argv[1:3])} timed out after {timeout:g}s") \
            from None
    except BaseException:
        # The caller was cancelled (its ttrpc deadline passed): the command must not outlive the call.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        for fd in readers:
            os.close(fd)
    out, err = (results[1], results[2]) if readers else (b"", b"")
    if check and status != 0:
        raise CommandError(argv, status, err.decode(errors="replace"))
    return status, out, err


async def _write_all(fd: int, data: bytes) -> None:
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await aio.wait_fd(fd, write=True)
        except BrokenPipeError:
            return
