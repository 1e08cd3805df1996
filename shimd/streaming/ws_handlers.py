"""Kubernetes channel protocols over WebSocket (aiohttp), as kubelet serves them.

Every message starts with a channel byte (base64 variants: an ASCII digit, then base64 text).
remotecommand: 0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 resize; v5 adds 255 = "close
channel N" (stdin half-close). portforward: channel 2i is data and 2i+1 errors for the i-th port;
the first message we send on each carries the port as 2 little-endian bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from shimd.streaming import portforward, remotecommand
from shimd.streaming.backend import StreamBackend, StreamIO
from shimd.streaming.tokens import AttachRequest, ExecRequest, PortForwardRequest

REMOTECOMMAND_PROTOCOLS = ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                           "channel.k8s.io", "base64.channel.k8s.io"]
PORTFORWARD_PROTOCOLS = ["portforward.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                         "channel.k8s.io", "base64.channel.k8s.io"]
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
MAX_MESSAGE = 16 * 1024 * 1024
CLOSE_TIMEOUT = 5.0
CHUNK = 64 * 1024


def requested_protocols(request: web.Request) -> list[str]:
    raw = request.headers.getall("Sec-WebSocket-Protocol", [])
    return [p.strip() for value in raw for p in value.split(",") if p.strip()]


def negotiate(request: web.Request, supported: list[str]) -> str | None:
    """First client-offered protocol we support; "" when the client offers none; None if no match."""
    offered = requested_protocols(request)
    if not offered:
        return ""
    return next((p for p in offered if p in supported), None)


class ChannelSocket:
    """Channel framing over one prepared WebSocketResponse."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, protocol: str) -> None:
        self.request, self.ws = request, ws
        self.base64 = "base64" in protocol

    async def send(self, channel: int, data: bytes) -> None:
        if self.ws.closed:
            raise ConnectionResetError("websocket closed")
        for i in range(0, max(len(data), 1), CHUNK):
            piece = data[i:i + CHUNK]
            if self.base64:
                await self.ws.send_str(chr(ord("0") + channel) + base64.b64encode(piece).decode())
            else:
                await self.ws.send_bytes(bytes([channel]) + piece)

    def decode(self, msg: Any) -> tuple[int, bytes] | None:
        if msg.type == WSMsgType.BINARY and not self.base64:
            data: bytes = msg.data
            return (data[0], data[1:]) if data else None
        if msg.type == WSMsgType.TEXT and self.base64:
            text: str = msg.data
            if not text:
                return None
            try:
                return ord(text[0]) - ord("0"), base64.b64decode(text[1:])
            except ValueError:
                return None
        return None

    def transport_alive(self) -> bool:
        # ws.closed only flips on a close handshake; a dropped TCP connection shows on the transport.
        transport = self.request.transport
        return not self.ws.closed and transport is not None and not transport.is_closing()


async def serve_remotecommand(request: web.Request, req: ExecRequest | AttachRequest, protocol: str,
                              backend: StreamBackend, log: Any) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=[protocol] if protocol else (), compress=False,
                               max_msg_size=MAX_MESSAGE, timeout=CLOSE_TIMEOUT)
    await ws.prepare(request)
    sock = ChannelSocket(request, ws, protocol)
    stdin, gate = remotecommand.new_stdin() if req.stdin else (None, None)
    resize: asyncio.Queue[tuple[int, int]] | None = asyncio.Queue(maxsize=16) if req.tty else None
    decoder = remotecommand.ResizeDecoder(resize, log) if resize is not None else None
    disconnected = asyncio.Event()

    def out(channel: int) -> Callable[[bytes], Awaitable[None]]:
        async def write(data: bytes) -> None:
            await sock.send(channel, data)
        return write

    io = StreamIO(tty=req.tty, stdin=stdin, stdout=out(STDOUT) if req.stdout else None,
                  stderr=out(STDERR) if req.stderr else None, resize=resize)

    async def receive() -> None:
        try:
            async for msg in ws:
                frame = sock.decode(msg)
                if frame is None:
                    continue
                channel, data = frame
                if channel == STDIN and stdin is not None and gate is not None and not stdin.at_eof():
                    if data:
                        stdin.feed_data(data)
                        await gate.wait(sock.transport_alive)
                elif channel == RESIZE and decoder is not None:
                    decoder.feed(data)
                elif channel == CLOSE and protocol == "v5.channel.k8s.io" and data[:1] == bytes([STDIN]):
                    if stdin is not None and not stdin.at_eof():
                        stdin.feed_eof()
        finally:
            disconnected.set()
            if stdin is not None:
                stdin.feed_eof()

    # Tells the client the session is up: an empty message on the lowest channel it will read.
    first = STDOUT if req.stdout else STDERR if req.stderr else ERROR
    receiver = asyncio.ensure_future(receive())
    try:
        with contextlib.suppress(ConnectionError):
            await sock.send(first, b"")
        await remotecommand.run(req, backend, io, lambda body: sock.send(ERROR, body),
                                protocol.startswith(("v4.", "v5.")), disconnected, log)
        with contextlib.suppress(ConnectionError):
            await ws.close()
    finally:
        receiver.cancel()
        await asyncio.wait({receiver}, timeout=CLOSE_TIMEOUT)
    return ws


async def serve_portforward(request: web.Request, req: PortForwardRequest, ports: list[int], protocol: str,
                            backend: StreamBackend, log: Any) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=[protocol] if protocol else (), compress=False,
                               max_msg_size=MAX_MESSAGE, timeout=CLOSE_TIMEOUT)
    await ws.prepare(request)
    sock = ChannelSocket(request, ws, protocol)
    inbound: list[asyncio.Queue[bytes]] = [asyncio.Queue(maxsize=64) for _ in ports]

    async def receive() -> None:
        try:
            async for msg in ws:
                frame = sock.decode(msg)
                if frame is None:
                    continue
                channel, data = frame
                index, is_error = divmod(channel, 2)
                if is_error or index >= len(ports) or not data:
                    continue
                # A bounded queue per port: a slow pod connection stalls the socket, not memory.
                while sock.transport_alive():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await inbound[index].put(data)
                            break
        finally:
            for q in inbound:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(b"")

    async def forward(index: int, port: int) -> None:
        data_ch, err_ch = 2 * index, 2 * index + 1
        prefix = struct.pack("<H", port)
        await sock.send(data_ch, prefix)
        await sock.send(err_ch, prefix)
        try:
            reader, writer = await portforward.dial(backend, req.pod_id, port)
        except Exception as e:
            log.warning("port-forward failed", port=port, error=str(e))
            await sock.send(err_ch, f"error forwarding port {port} to pod {req.pod_id}: {e}".encode())
            return

        async def client_write(data: bytes) -> None:
            await sock.send(data_ch, data)

        try:
            await portforward.pump(reader, writer, inbound[index].get, client_write, lambda: not sock.transport_alive())
        except ConnectionError:
            pass
        except Exception as e:
            await sock.send(err_ch, f"error forwarding port {port} to pod {req.pod_id}: {e}".encode())

    receiver = asyncio.ensure_future(receive())
    forwards = [asyncio.ensure_future(forward(i, p)) for i, p in enumerate(ports)]
    all_done = asyncio.gather(*forwards, return_exceptions=True)
    try:
        # Like kubelet: the connection ends when every port's forward has ended, or the client left.
        await asyncio.wait({all_done, receiver}, return_when=asyncio.FIRST_COMPLETED)
        with contextlib.suppress(ConnectionError):
            await ws.close()
    finally:
        for t in (*forwards, receiver):
            t.cancel()
        await asyncio.wait({*forwards, receiver}, timeout=CLOSE_TIMEOUT)
    return ws
