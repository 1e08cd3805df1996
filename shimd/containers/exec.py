"""Running extra processes in a container through its shim (ExecSync, streaming Exec).

The shim gets FIFO paths for the process's stdio, as containerd gives them. shimd opens its ends
first (read ends non-blocking, the stdin end read-write) so neither side blocks in open().
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import betterproto.lib.google.protobuf as pb

from shimd import errors, log
from shimd.api.containerd.task import v2 as task
from shimd.store.records import CONTAINER_RUNNING

if TYPE_CHECKING:
    from shimd.shimmgr.manager import ShimManager
    from shimd.store.store import Store

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
# The CRI caps ExecSync output at 16 MiB per stream.
EXEC_SYNC_LIMIT = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024
STDIN_DRAIN_TIMEOUT = 10.0

Sink = Callable[[bytes], Awaitable[None]]


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False


class Execs:
    def __init__(self, store: Store, shims: ShimManager, state_dir: Path) -> None:
        self.store = store
        self.shims = shims
        self.dir = state_dir / "exec"
        self.log = log.get("exec")

    def _process_spec(self, bundle: str, cmd: list[str], tty: bool) -> bytes:
        with open(Path(bundle) / "config.json", "rb") as f:
            process = json.load(f)["process"]
        process["args"] = list(cmd)
        process["terminal"] = tty
        process.pop("oomScoreAdj", None)
        return json.dumps(process).encode()

    async def run(self, container_id: str, cmd: list[str], *, tty: bool, stdin: asyncio.StreamReader | None,
                  stdout: Sink | None, stderr: Sink | None, resize: asyncio.Queue[tuple[int, int]] | None,
                  timeout: float | None = None) -> int:
        """Run cmd to completion; returns its exit code. Raises DeadlineExceeded after killing it on timeout."""
        if not cmd:
            raise errors.InvalidArgument("cmd must not be empty")
        ctr = self.store.container(container_id)
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running (state {ctr.state})")
        exec_id = secrets.token_hex(8)
        fifo_dir = self.dir / exec_id
        lg = self.log.bind(pod_id=ctr.pod_id, container_id=ctr.id, exec_id=exec_id)
        spec = await asyncio.to_thread(self._process_spec, ctr.bundle, cmd, tty)
        paths = {name: fifo_dir / name for name in ("stdin", "stdout", "stderr")}
        fds: dict[str, int] = {}
        # Our own spare ends of the FIFOs: until the process is done they keep our readers from seeing
        # EOF, and our stdin writer from EPIPE, before the shim opens its end (shims differ in when).
        keepers: list[int] = []
        spare: list[int] = []  # the stdin FIFO's spare read end, closed only once its pump is gone
        started = False
        pumps: list[asyncio.Task[None]] = []
        out_pumps: list[asyncio.Task[None]] = []

        def make_fifos() -> None:
            fifo_dir.mkdir(parents=True, exist_ok=True)
            for name, path in paths.items():
                if (name == "stdin" and stdin is None) or (name == "stderr" and (stderr is None or tty)):
                    continue
                if name == "stdout" and stdout is None:
                    continue
                os.mkfifo(path, 0o600)
                if name == "stdin":
                    # A read end we never read from lets the write end open now and never see EPIPE
                    # before the shim opens its own; O_RDWR would look "readable" to the pipe transport.
                    spare.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                    fds[name] = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                else:
                    fds[name] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    keepers.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))

        try:
            await asyncio.to_thread(make_fifos)
            req = task.ExecProcessRequest(
                id=ctr.id, exec_id=exec_id, terminal=tty,
                stdin=str(paths["stdin"]) if "stdin" in fds else "",
                stdout=str(paths["stdout"]) if "stdout" in fds else "",
                stderr=str(paths["stderr"]) if "stderr" in fds else "",
                spec=pb.Any(type_url=PROCESS_TYPE_URL, value=spec),
            )
            client = await self.shims.client(ctr.pod_id)
            await client.exec(req, timeout=self.shims.timeout)
            for name, sink in (("stdout", stdout), ("stderr", stderr)):
                if name in fds and sink is not None:
                    pumps.append(asyncio.create_task(_pump_out(fds.pop(name), sink)))
            out_pumps = list(pumps)
            await self.shims.start(ctr.pod_id, ctr.id, exec_id)
            started = True
            if "stdin" in fds and stdin is not None:
                pumps.append(asyncio.create_task(self._pump_in(fds.pop("stdin"), spare[0], stdin, ctr.pod_id,
                                                               ctr.id, exec_id)))
            if resize is not None and tty:
                pumps.append(asyncio.create_task(self._pump_resize(resize, ctr.pod_id, ctr.id, exec_id)))
            try:
                info = await asyncio.wait_for(self.shims.wait(ctr.pod_id, ctr.id, exec_id), timeout)
            except TimeoutError:
                lg.info("exec timed out, killing", timeout=timeout)
                raise errors.DeadlineExceeded(f"command {cmd[0]!r} timed out after {timeout}s") from None
            # Output written just before exit may still be in the FIFOs: drain until the shim closes them.
            _close_all(keepers)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*out_pumps, return_exceptions=True), 5.0)
            return info.exit_status
        finally:
            if started:
                with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                    await self.shims.kill(ctr.pod_id, ctr.id, signal.SIGKILL, exec_id=exec_id)
                with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                    await self.shims.wait(ctr.pod_id, ctr.id, exec_id, timeout=10.0)
                with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                    await self.shims.delete(ctr.pod_id, ctr.id, exec_id)
            for p in pumps:
                p.cancel()
            for p in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await p
            _close_all(keepers)
            _close_all(spare)
            _close_all(list(fds.values()))
            await asyncio.to_thread(shutil.rmtree, fifo_dir, True)

    async def run_sync(self, container_id: str, cmd: list[str], timeout: float | None) -> ExecResult:
        out, err = _Capped(EXEC_SYNC_LIMIT), _Capped(EXEC_SYNC_LIMIT)
        code = await self.run(container_id, cmd, tty=False, stdin=None, stdout=out.add, stderr=err.add,
                              resize=None, timeout=timeout)
        return ExecResult(code, bytes(out.buf), bytes(err.buf), out.truncated or err.truncated)

    async def _pump_in(self, fd: int, spare_reader: int, reader: asyncio.StreamReader, pod_id: str, cid: str,
                       exec_id: str) -> None:
        await copy_into_fifo(reader, fd)
        # Shims that hold their own writer on the FIFO need CloseIO to pass EOF on; it must come only once
        # the shim has read everything still queued in the FIFO, or that tail is lost.
        await _fifo_drained(spare_reader, STDIN_DRAIN_TIMEOUT)
        with contextlib.suppress(errors.ShimdError, OSError, TimeoutError):
            client = await self.shims.client(pod_id)
            await client.close_io(task.CloseIoRequest(id=cid, exec_id=exec_id, stdin=True),
                                  timeout=self.shims.timeout)

    async def close_stdin(self, pod_id: str, cid: str, exec_id: str = "") -> None:
        client = await self.shims.client(pod_id)
        await client.close_io(task.CloseIoRequest(id=cid, exec_id=exec_id, stdin=True), timeout=self.shims.timeout)

    async def follow_resizes(self, q: asyncio.Queue[tuple[int, int]], pod_id: str, cid: str) -> None:
        await self._pump_resize(q, pod_id, cid, "")

    async def _pump_resize(self, q: asyncio.Queue[tuple[int, int]], pod_id: str, cid: str, exec_id: str) -> None:
        while True:
            width, height = await q.get()
            with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                client = await self.shims.client(pod_id)
                await client.resize_pty(task.ResizePtyRequest(id=cid, exec_id=exec_id, width=width, height=height),
                                        timeout=self.shims.timeout)


async def _fifo_drained(fd: int, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    buf = bytearray(4)
    while asyncio.get_running_loop().time() < deadline:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, buf)
        except OSError:
            return
        if int.from_bytes(buf, "little") == 0:
            return
        await asyncio.sleep(0.01)


async def copy_into_fifo(reader: asyncio.StreamReader, fd: int) -> None:
    """Copy reader to the FIFO write end fd (taking ownership of fd) until EOF, with backpressure."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin,
                                                        os.fdopen(fd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        while chunk := await reader.read(READ_CHUNK):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


class _Capped:
    def __init__(self, limit: int) -> None:
        self.buf = bytearray()
        self.limit = limit
        self.truncated = False

    async def add(self, data: bytes) -> None:
        room = self.limit - len(self.buf)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.buf += data


async def _pump_out(fd: int, sink: Sink) -> None:
    """Copy a FIFO to sink until every writer has closed it."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", buffering=0))
    try:
        while chunk := await reader.read(READ_CHUNK):
            await sink(chunk)
    finally:
        transport.close()
