"""ttrpc framing and an asyncio ttrpc server.

Wire facts (containerd/ttrpc): every message is a 10-byte header — payload length (uint32 BE),
stream id (uint32 BE), message type (1 request, 2 response), flags — then the payload, at most
4 MiB. A request payload is a ttrpc Request {service, method, payload, timeout_nano, metadata}; the
answer is a Response {status (google.rpc.Status), payload} on the same stream id. Clients use odd
stream ids. Status codes are gRPC's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from shims.common import messages as m
from shims.common.proto import DecodeError, Schema, decode, encode

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size  # 10
MAX_MESSAGE = 4 << 20
TYPE_REQUEST, TYPE_RESPONSE = 1, 2

# gRPC status codes used by ttrpc.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS = 0, 1, 2, 3, 4, 5, 6
PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE = 7, 8, 9, 10, 11
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED = 12, 13, 14, 15, 16


class TtrpcError(Exception):
    """A non-OK ttrpc status: raised by handlers, and by clients on a failed call."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameTooLarge(Exception):
    def __init__(self, stream_id: int, length: int) -> None:
        super().__init__(f"message length {length} exceeds the maximum of {MAX_MESSAGE}")
        self.stream_id = stream_id
        self.length = length


def pack_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise FrameTooLarge(stream_id, len(payload))
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    """One (stream_id, type, flags, payload); raises FrameTooLarge before reading an oversized body."""
    length, stream_id, mtype, flags = HEADER.unpack(await reader.readexactly(HEADER_LEN))
    if length > MAX_MESSAGE:
        raise FrameTooLarge(stream_id, length)
    payload = await reader.readexactly(length) if length else b""
    return stream_id, mtype, flags, payload


def encode_request(service: str, method: str, payload: bytes, timeout_ns: int = 0) -> bytes:
    return encode(m.TTRPC_REQUEST, {"service": service, "method": method, "payload": payload,
                                    "timeout_nano": timeout_ns})


def encode_response(payload: bytes = b"", code: int = OK, message: str = "") -> bytes:
    status = {"code": code, "message": message} if code != OK else None
    return encode(m.TTRPC_RESPONSE, {"status": status, "payload": payload})


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    resp = decode(m.TTRPC_RESPONSE, data)
    status = resp["status"] or {"code": OK, "message": ""}
    return status["code"], status["message"], resp["payload"]


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Service:
    """Named ttrpc service: method name -> (request schema, response schema, handler)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.methods: dict[str, tuple[Schema, Schema, Handler]] = {}

    def register(self, method: str, req: Schema, resp: Schema, handler: Handler) -> None:
        self.methods[method] = (req, resp, handler)


class Server:
    """Serves ttrpc on a unix socket; each request runs as its own task so slow calls (Wait) never
    hold up others on the same connection."""

    def __init__(self, services: list[Service], on_error: Callable[[str, BaseException], None]) -> None:
        self.services = {s.name: s for s in services}
        self.on_error = on_error
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def listen(self, path: str, sock: socket.socket | None = None) -> None:
        """Serve on path, or on sock when the launcher already bound and listens on it for us."""
        if sock is not None:
            self._server = await asyncio.start_unix_server(self._serve_conn, sock=sock)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve_conn, path=path)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._writers):
            w.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    stream_id, mtype, _flags, payload = await read_frame(reader)
                except FrameTooLarge as e:
                    # The body is not read, so the stream cannot be resynchronised: answer and hang up.
                    writer.write(pack_frame(e.stream_id, TYPE_RESPONSE, encode_response(code=RESOURCE_EXHAUSTED,
                                                                                      message=str(e))))
                    await writer.drain()
                    return
                if mtype != TYPE_REQUEST:
                    continue
                if stream_id % 2 != 1:
                    writer.write(pack_frame(stream_id, TYPE_RESPONSE, encode_response(
                        code=INVALID_ARGUMENT, message="stream id must be odd for client-initiated streams")))
                    continue
                self._spawn(self._dispatch(writer, stream_id, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _dispatch(self, writer: asyncio.StreamWriter, stream_id: int, payload: bytes) -> None:
        try:
            out = encode_response(await self._call(payload))
        except TtrpcError as e:
            out = encode_response(code=e.code, message=e.message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug must answer the caller, not kill the server
            self.on_error("handler failed", e)
            out = encode_response(code=UNKNOWN, message=f"{type(e).__name__}: {e}")
        if writer.is_closing():
            return
        try:
            frame = pack_frame(stream_id, TYPE_RESPONSE, out)
        except FrameTooLarge as e:
            frame = pack_frame(stream_id, TYPE_RESPONSE, encode_response(code=RESOURCE_EXHAUSTED, message=str(e)))
        writer.write(frame)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _call(self, payload: bytes) -> bytes:
        try:
            req = decode(m.TTRPC_REQUEST, payload)
        except DecodeError as e:
            raise TtrpcError(INVALID_ARGUMENT, f"bad ttrpc request: {e}") from e
        service = self.services.get(req["service"])
        entry = service.methods.get(req["method"]) if service else None
        if entry is None:
            raise TtrpcError(UNIMPLEMENTED, f"{req['service']}/{req['method']} is not implemented")
        req_schema, resp_schema, handler = entry
        try:
            body = decode(req_schema, req["payload"])
        except DecodeError as e:
            raise TtrpcError(INVALID_ARGUMENT, f"bad {req['method']} request: {e}") from e
        timeout = req["timeout_nano"] / 1e9 if req["timeout_nano"] > 0 else None
        try:
            result = await asyncio.wait_for(handler(body), timeout)
        except TimeoutError as e:
            raise TtrpcError(DEADLINE_EXCEEDED, f"{req['method']} timed out") from e
        return encode(resp_schema, result)
