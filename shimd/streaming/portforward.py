"""Port-forward plumbing shared by SPDY and WebSocket: dial through the backend, pump both ways."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from shimd.streaming.backend import StreamBackend

DIAL_TIMEOUT_SECONDS = 10.0
CHUNK = 32 * 1024


def check_port(raw: str, allowed: list[int]) -> int:
    """Parse a port header/query value; ValueError names what is wrong."""
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"invalid port {raw!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if allowed and port not in allowed:
        raise ValueError(f"port {port} was not requested in PortForward (ports {allowed})")
    return port


async def dial(backend: StreamBackend, pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(DIAL_TIMEOUT_SECONDS):
        return await backend.port_forward(pod_id, port)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               client_read: Callable[[], Awaitable[bytes]], client_write: Callable[[bytes], Awaitable[None]],
               client_reset: Callable[[], bool]) -> None:
    """Copy client->pod and pod->client until the pod side closes (as kubelet: the remote side
    finishing ends the forward) or the client resets. A client half-close becomes a TCP half-close."""

    async def upstream() -> None:
        while chunk := await client_read():
            writer.write(chunk)
            await writer.drain()
        if not client_reset() and writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()

    async def downstream() -> None:
        while chunk := await reader.read(CHUNK):
            await client_write(chunk)

    up = asyncio.ensure_future(upstream())
    down = asyncio.ensure_future(downstream())
    try:
        pending: set[asyncio.Future[None]] = {up, down}
        while down in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if up in done and (up.exception() is not None or client_reset()):
                break
        for t in (up, down):
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        for t in (up, down):
            t.cancel()
        await asyncio.wait({up, down}, timeout=5)
        writer.close()
