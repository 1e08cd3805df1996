"""Fixtures for the streaming server tests: a StreamBackend over real local processes and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from shimd.config import StreamingConfig
from shimd.streaming.backend import StreamIO
from shimd.streaming.server import StreamingServer

BUSYBOX = "/bin/busybox"
# A container's environment, not the test runner's (pytest exports COLUMNS/LINES, which stty prefers).
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TERM": "xterm", "HOME": "/"}


async def _copy_out(stream: asyncio.StreamReader, sink: object) -> None:
    while chunk := await stream.read(65536):
        await sink(chunk)  # type: ignore[operator]


async def _copy_in(source: asyncio.StreamReader, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    try:
        while chunk := await source.read(65536):
            proc.stdin.write(chunk)
            await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        proc.stdin.close()


@dataclass
class LocalBackend:
    """exec runs cmd as a local process; attach starts `containers[id]` (once) and attaches to it;
    port_forward dials 127.0.0.1:port. Every process is recorded so tests can check for leftovers."""

    containers: dict[str, list[str]] = field(default_factory=dict)
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    cancelled: int = 0
    dialed: list[int] = field(default_factory=list)

    async def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        if io.tty:
            return await self._run_tty(cmd, io)
        return await self._run_pipes(cmd, io)

    async def attach(self, container_id: str, io: StreamIO) -> None:
        await self.exec(container_id, self.containers[container_id], io)

    async def port_forward(self, pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.dialed.append(port)
        return await asyncio.open_connection("127.0.0.1", port)

    def alive(self) -> list[asyncio.subprocess.Process]:
        return [p for p in self.procs if p.returncode is None]

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        self.cancelled += 1
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        async with asyncio.timeout(5):
            await proc.wait()

    async def _run_pipes(self, cmd: list[str], io: StreamIO) -> int:
        pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=pipe if io.stdin else null, stdout=pipe if io.stdout else null,
            stderr=pipe if io.stderr else null, start_new_session=True, env=CHILD_ENV)
        self.procs.append(proc)
        tasks = []
        if io.stdin is not None:
            tasks.append(asyncio.ensure_future(_copy_in(io.stdin, proc)))
        outs = [asyncio.ensure_future(_copy_out(s, sink)) for s, sink in ((proc.stdout, io.stdout),
                                                                           (proc.stderr, io.stderr))
                if s is not None and sink is not None]
        try:
            if outs:
                await asyncio.gather(*outs)
            return await proc.wait()
        except asyncio.CancelledError:
            await self._reap(proc)
            raise
        finally:
            for t in tasks + outs:
                t.cancel()
            await asyncio.gather(*tasks, *outs, return_exceptions=True)

    async def _run_tty(self, cmd: list[str], io: StreamIO) -> int:
        master, slave = os.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=slave, stdout=slave, stderr=slave,
                                                        start_new_session=True, env=CHILD_ENV)
        finally:
            os.close(slave)
        self.procs.append(proc)
        os.set_blocking(master, False)
        loop = asyncio.get_running_loop()
        output: asyncio.Queue[bytes] = asyncio.Queue()

        def readable() -> None:
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: the last slave fd is closed
                data = b""
            if not data:
                loop.remove_reader(master)
            output.put_nowait(data)

        loop.add_reader(master, readable)

        async def pump_out() -> None:
            while data := await output.get():
                if io.stdout is not None:
                    await io.stdout(data)

        async def pump_in() -> None:
            assert io.stdin is not None
            while chunk := await io.stdin.read(4096):
                os.write(master, chunk)
            os.write(master, b"\x04")  # EOF for a terminal is ^D

        async def pump_resize() -> None:
            assert io.resize is not None
            while True:
                width, height = await io.resize.get()
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

        helpers = [asyncio.ensure_future(pump_in())] if io.stdin is not None else []
        if io.resize is not None:
            helpers.append(asyncio.ensure_future(pump_resize()))
        out = asyncio.ensure_future(pump_out())
        try:
            code = await proc.wait()
            async with asyncio.timeout(5):
                await out
            return code
        except asyncio.CancelledError:
            await self._reap(proc)
            raise
        finally:
            loop.remove_reader(master)
            for t in [*helpers, out]:
                t.cancel()
            await asyncio.gather(*helpers, out, return_exceptions=True)
            os.close(master)


@pytest.fixture
def local_backend() -> LocalBackend:
    return LocalBackend()


# The tests run on a per-test event loop (the default); the server must live on that same loop.
@pytest_asyncio.fixture(loop_scope="function")
async def streaming_server(local_backend: LocalBackend) -> AsyncIterator[StreamingServer]:
    server = StreamingServer(StreamingConfig(address="127.0.0.1:0", token_ttl_seconds=60.0), local_backend)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
        for proc in local_backend.alive():
            proc.kill()


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until predicate() is truthy (state owned by other tasks or processes); TimeoutError if not."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(interval)
