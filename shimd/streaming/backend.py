"""What the streaming server needs from the container layer; the daemon supplies the implementation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass
class StreamIO:
    """The client's side of an exec/attach, in terms a backend can use directly.

    stdout/stderr apply backpressure: awaiting them waits until the client has room. They raise
    ConnectionError once the client has gone; the backend call is cancelled at that point anyway.
    """

    tty: bool
    stdin: asyncio.StreamReader | None  # EOF when the client closes stdin
    stdout: Callable[[bytes], Awaitable[None]] | None
    stderr: Callable[[bytes], Awaitable[None]] | None
    resize: asyncio.Queue[tuple[int, int]] | None  # (width, height)


class StreamBackend(Protocol):
    async def exec(self, container_id: str, cmd: list[str], io: StreamIO) -> int:
        """Run cmd in the container and return its exit code (128+signal when killed)."""
        ...

    async def attach(self, container_id: str, io: StreamIO) -> None:
        """Connect io to the container's main process until it exits or the call is cancelled."""
        ...

    async def port_forward(self, pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection to port inside the pod's network namespace."""
        ...
