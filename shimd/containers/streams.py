"""The streaming server's backend: exec, attach and port-forward against real containers and pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from shimd import errors
from shimd.containers.exec import copy_into_fifo
from shimd.containers.service import STDIN_FIFO
from shimd.store.records import CONTAINER_RUNNING, ContainerRecord
from shimd.streaming.backend import StreamIO
from shimd.streaming.netns_dial import dial_in_netns
from shimproto.messages import ATTACH_HEADER_SIZE, ATTACH_STDOUT
from shimproto.paths import attach_socket_path

if TYPE_CHECKING:
    from shimd.containers.exec import Execs
    from shimd.store.store import Store

DIAL_TIMEOUT = 10.0
# How often an attached client's log follower looks for new output.
FOLLOW_INTERVAL = 0.05


class ContainerStreams:
    def __init__(self, store: Store, execs: Execs) -> None:
        self.store = store
        self.execs = execs

    async def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        return await self.execs.run(container_id, cmd, tty=io.tty, stdin=io.stdin, stdout=io.stdout,
                                    stderr=io.stderr, resize=io.resize)

    async def attach(self, container_id: str, io: StreamIO) -> None:
        """Output comes from the shim's attach socket of the container (the shim owns the process's stdio),
        or for a shim without one (shim v2 binaries, shims started before it existed) follows the CRI log;
        input goes to the stdin FIFO the shim reads; resizes go to the shim's pty."""
        ctr = self.store.container(container_id)
        wants_output = bool(io.stdout or io.stderr)
        output = await self._connect_output(ctr) if wants_output else None
        if output is None and wants_output and not ctr.log_path:
            if ctr.state != CONTAINER_RUNNING:
                return  # exited since the URL was handed out (its shim removed the socket): nothing will come
            raise errors.FailedPrecondition(f"container {ctr.id}: its shim serves no attach socket and it has "
                                            "no log file to follow")
        if io.stdin is not None and not ctr.stdin:
            if output is not None:
                output[1].close()
            raise errors.FailedPrecondition(f"container {ctr.id} was not created with stdin")
        helpers: list[asyncio.Task[None]] = []
        if io.stdin is not None:
            helpers.append(asyncio.create_task(self._feed_stdin(ctr, io.stdin)))
        if io.resize is not None and ctr.tty:
            helpers.append(asyncio.create_task(self.execs.follow_resizes(io.resize, ctr.pod_id, ctr.id)))
        try:
            if output is not None:
                await _relay_output(output[0], io)
            else:  # the log file; for input only, just until the container exits
                await self._follow_output(ctr, io)
        finally:
            if output is not None:
                output[1].close()
            for t in helpers:
                t.cancel()
            for t in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _connect_output(self, ctr: ContainerRecord
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        pod = self.store.pods.get(ctr.pod_id)
        if pod is None or not pod.shim_address:
            return None
        path = attach_socket_path(os.path.dirname(pod.shim_address.removeprefix("unix://")), ctr.id)
        try:
            return await asyncio.wait_for(asyncio.open_unix_connection(path), DIAL_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no attach socket from this shim: the log file is followed instead

    async def _follow_output(self, ctr: ContainerRecord, io: StreamIO) -> None:
        pos = await asyncio.to_thread(_size, ctr.log_path) if ctr.log_path else 0
        pending = b""
        while True:
            data, pos = await asyncio.to_thread(_read_from, ctr.log_path, pos) if ctr.log_path else (b"", 0)
            if data:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    await _emit(line, io)
            elif ctr.state != CONTAINER_RUNNING:
                return
            else:
                await asyncio.sleep(FOLLOW_INTERVAL)

    async def _feed_stdin(self, ctr: ContainerRecord, reader: asyncio.StreamReader) -> None:
        fd = await asyncio.to_thread(os.open, str(Path(ctr.bundle) / STDIN_FIFO),
                                     os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        await copy_into_fifo(reader, fd)
        if _stdin_once(ctr):
            # kubelet's stdinOnce: the first attached client closing stdin closes it for good.
            with contextlib.suppress(errors.ShimdError, OSError, TimeoutError):
                await self.execs.close_stdin(ctr.pod_id, ctr.id)

    async def port_forward(self, pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pod = self.store.pod(pod_id)
        netns = pod.namespaces.get("network")
        if pod.host_network or not netns:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DIAL_TIMEOUT)
        return await dial_in_netns(netns, "127.0.0.1", port, DIAL_TIMEOUT)


def _stdin_once(ctr: ContainerRecord) -> bool:
    return bool(ctr.config.get("stdinOnce"))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_from(path: str, pos: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < pos:  # rotated: start over in the new file
                pos = 0
            f.seek(pos)
            data = f.read(1 << 20)
    except FileNotFoundError:
        return b"", 0
    return data, pos + len(data)


async def _relay_output(reader: asyncio.StreamReader, io: StreamIO) -> None:
    """Frames from the shim's attach socket until it closes them at the process's exit."""
    while True:
        try:
            header = await reader.readexactly(ATTACH_HEADER_SIZE)
            data = await reader.readexactly(int.from_bytes(header[1:], "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        sink = io.stdout if header[0] == ATTACH_STDOUT or io.tty else io.stderr
        if sink is not None:
            await sink(data)


async def _emit(line: bytes, io: StreamIO) -> None:
    """One CRI log line: `<time> <stream> <F|P> <content>`; P lines continue without a newline."""
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        return
    stream, tag = parts[1], parts[2]
    content = parts[3] if len(parts) == 4 else b""
    if tag == b"F":
        content += b"\n"
    sink = io.stdout if stream == b"stdout" or io.tty else io.stderr
    if sink is not None:
        await sink(content)
