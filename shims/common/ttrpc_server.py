"""The shim's ttrpc server (framing in ttrpc.py), on the shim's own event loop (aio.py)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

from shimproto import messages as m
from shimproto.proto import DecodeError, decode, encode
from shimproto.ttrpc import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    UNIMPLEMENTED,
    UNKNOWN,
    FrameTooLarge,
    Service,
    TtrpcError,
    encode_response,
    pack_frame,
    read_frame,
)
from shims.common import aio


class Server:
    """Serves ttrpc on a unix socket; each request runs as its own task so slow calls (Wait) never
    hold up others on the same connection."""

    def __init__(self, services: list[Service], on_error: Callable[[str, BaseException], None]) -> None:
        self.services = {s.name: s for s in services}
        self.on_error = on_error
        self._server: aio.UnixServer | None = None
        self._tasks: set[aio.Future] = set()
        self._conns: set[aio.Connection] = set()

    async def listen(self, path: str, sock: socket.socket | None = None) -> None:
        """Serve on path, or on sock when the launcher already bound and listens on it for us."""
        if sock is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
        self._server = aio.UnixServer(sock, self._serve_conn)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._conns):
            w.close()
        if self._tasks:
            await aio.wait(list(self._tasks), timeout=2.0)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = aio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _serve_conn(self, conn: aio.Connection) -> None:
        self._conns.add(conn)
        try:
            while True:
                try:
                    stream_id, mtype, _flags, payload = await read_frame(conn)
                except FrameTooLarge as e:
                    # The body is not read, so the stream cannot be resynchronised: answer and hang up.
                    conn.write(pack_frame(e.stream_id, TYPE_RESPONSE, encode_response(code=RESOURCE_EXHAUSTED,
                                                                                      message=str(e))))
                    await conn.drain()
                    return
                if mtype != TYPE_REQUEST:
                    continue
                if stream_id % 2 != 1:
                    conn.write(pack_frame(stream_id, TYPE_RESPONSE, encode_response(
                        code=INVALID_ARGUMENT, message="stream id must be odd for client-initiated streams")))
                    continue
                self._spawn(self._dispatch(conn, stream_id, payload))
        except (aio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _dispatch(self, writer: aio.Connection, stream_id: int, payload: bytes) -> None:
        try:
            out = encode_response(await self._call(payload))
        except TtrpcError as e:
            out = encode_response(code=e.code, message=e.message)
        except aio.CancelledError:
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
            result = await aio.wait_for(handler(body), timeout)
        except TimeoutError as e:
            raise TtrpcError(DEADLINE_EXCEEDED, f"{req['method']} timed out") from e
        return encode(resp_schema, result)
