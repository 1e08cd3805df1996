"""The streaming server's backend: exec, attach and port-forward against real containers and pods."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from shimd import errors
from shimd.store.records import CONTAINER_RUNNING
from shimd.streaming.backend import StreamIO
from shimd.streaming.netns_dial import dial_in_netns

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
        """Follows the container's output from its CRI log (the shim owns the process's stdio)."""
        ctr = self.store.container(container_id)
        if not ctr.log_path:
            raise errors.FailedPrecondition(f"container {ctr.id} has no log file to attach to")
        if io.stdin is not None:
            raise errors.FailedPrecondition("attaching stdin is not supported by shimd yet")
        pos = await asyncio.to_thread(_size, ctr.log_path)
        pending = b""
        while True:
            data, pos = await asyncio.to_thread(_read_from, ctr.log_path, pos)
            if data:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    await _emit(line, io)
            elif ctr.state != CONTAINER_RUNNING:
                return
            else:
                await asyncio.sleep(FOLLOW_INTERVAL)

    async def port_forward(self, pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pod = self.store.pod(pod_id)
        netns = pod.namespaces.get("network")
        if pod.host_network or not netns:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DIAL_TIMEOUT)
        return await dial_in_netns(netns, "127.0.0.1", port, DIAL_TIMEOUT)


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
