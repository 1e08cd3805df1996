"""StreamingServer: the URLs CRI Exec/Attach/PortForward return, and the sessions behind them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Coroutine
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from shimd import log as shimd_log
from shimd.config import StreamingConfig
from shimd.errors import InvalidArgument, Unavailable
from shimd.streaming import spdy_handlers, ws_handlers
from shimd.streaming.backend import StreamBackend
from shimd.streaming.frontdoor import FrontDoor, RequestHead
from shimd.streaming.spdy_session import SpdySession
from shimd.streaming.tokens import AttachRequest, ExecRequest, PortForwardRequest, StreamRequest, TokenCache

KINDS = ("exec", "attach", "portforward")
# After exec/attach ends, how long the client gets to read the tail and close before we do.
LINGER_SECONDS = 5.0
CLOSE_TIMEOUT_SECONDS = 10.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class StreamingServer:
    def __init__(self, cfg: StreamingConfig, backend: StreamBackend) -> None:
        self._cfg, self._backend = cfg, backend
        self._tokens = TokenCache(cfg.token_ttl_seconds)
        self._log = shimd_log.get("streaming")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._base_url = ""

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        host, port = split_address(self._cfg.address)
        ssl_ctx = await asyncio.to_thread(self._ssl_context) if self._cfg.tls_cert else None
        app = web.Application()
        for kind in KINDS:
            app.router.add_route("*", f"/{kind}/{{token}}", self._handle_http)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        http_server = self._runner.server
        assert http_server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: FrontDoor(self._on_spdy, http_server),
                                                host or None, port, ssl=ssl_ctx)
        bound = self._server.sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        self._base_url = f"{'https' if ssl_ctx else 'http'}://{url_host}:{bound}"
        self._log.info("streaming server listening", url=self._base_url)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self._cfg.tls_cert, self._cfg.tls_key)
        return ctx

    async def close(self) -> None:
        """Stop listening and cancel every live session (their backend calls included)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_SECONDS)
        if self._runner is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self._server.wait_closed()
            self._server = None
        self._base_url = ""

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def live_sessions(self) -> int:
        return len(self._tasks)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- URLs -------------------------------------------------------------------------------
    def _url(self, request: StreamRequest) -> str:
        if not self._base_url:
            raise Unavailable("streaming server is not running")
        return f"{self._base_url}/{request.kind}/{self._tokens.insert(request)}"

    def exec_url(self, container_id: str, cmd: list[str], tty: bool, stdin: bool, stdout: bool,
                 stderr: bool) -> str:
        _check_io("ExecRequest", container_id, tty, stdin, stdout, stderr)
        if not cmd:
            raise InvalidArgument("ExecRequest.cmd must not be empty")
        return self._url(ExecRequest(container_id, list(cmd), tty, stdin, stdout, stderr))

    def attach_url(self, container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> str:
        _check_io("AttachRequest", container_id, tty, stdin, stdout, stderr)
        return self._url(AttachRequest(container_id, tty, stdin, stdout, stderr))

    def portforward_url(self, pod_id: str, ports: list[int]) -> str:
        if not pod_id:
            raise InvalidArgument("PortForwardRequest.pod_sandbox_id must not be empty")
        for p in ports:
            if not 0 < p < 65536:
                raise InvalidArgument(f"PortForwardRequest.port {p} is out of range 1-65535")
        return self._url(PortForwardRequest(pod_id, list(ports)))

    # ---- SPDY -------------------------------------------------------------------------------
    def _on_spdy(self, transport: asyncio.Transport, head: RequestHead, rest: bytes) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        proto = asyncio.StreamReaderProtocol(reader)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if rest:
            reader.feed_data(rest)
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        transport.resume_reading()
        self._spawn(self._serve_spdy(head, reader, writer))

    async def _serve_spdy(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._spdy_session(head, reader, writer)
        except Exception:  # nobody awaits this task: report here rather than at garbage collection
            self._log.exception("spdy session failed")
        finally:
            writer.close()

    async def _spdy_session(self, head: RequestHead, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        parts = head.path.strip("/").split("/")
        kind = parts[0] if len(parts) == 2 and parts[0] in KINDS else ""
        request = self._tokens.consume(parts[1], kind) if kind else None
        if request is None:
            writer.write(_plain(404, "Not Found", "unknown or expired streaming token"))
            return
        supported = (spdy_handlers.PORTFORWARD_PROTOCOLS if kind == "portforward"
                     else spdy_handlers.REMOTECOMMAND_PROTOCOLS)
        offered = head.get_all("x-stream-protocol-version")
        # Clients from before version negotiation send no header; they speak the oldest protocol.
        protocol = next((p for p in offered if p in supported), None) if offered else supported[-1]
        if protocol is None:
            accepted = "".join(f"X-Accepted-Stream-Protocol-Versions: {p}\r\n" for p in supported)
            writer.write(_plain(403, "Forbidden", f"unable to negotiate protocol: client supports {offered}, "
                                f"server accepts {supported}", accepted))
            return
        log = self._log.bind(**_context(request), transport="spdy", protocol=protocol)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     + f"X-Stream-Protocol-Version: {protocol}\r\n\r\n".encode())
        handler: spdy_handlers.SpdyRemoteCommand | spdy_handlers.SpdyPortForward
        if isinstance(request, PortForwardRequest):
            handler = spdy_handlers.SpdyPortForward(request, self._backend, log)
        else:
            handler = spdy_handlers.SpdyRemoteCommand(request, protocol, self._backend, log)
        session = SpdySession(reader, writer, handler.on_stream, log)
        handler.session = session
        frames = asyncio.ensure_future(session.run())
        try:
            await handler.run()
            if not session.closed.is_set():
                await session.finish(LINGER_SECONDS)
        finally:
            frames.cancel()
            await asyncio.wait({frames}, timeout=CLOSE_TIMEOUT_SECONDS)
            session.close()

    # ---- HTTP / WebSocket ---------------------------------------------------------------------
    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        kind = request.path.strip("/").split("/")[0]
        bound = self._tokens.consume(request.match_info["token"], kind)
        if bound is None:
            raise web.HTTPNotFound(text="unknown or expired streaming token")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPBadRequest(text="upgrade to SPDY/3.1 or WebSocket required")
        supported = ws_handlers.PORTFORWARD_PROTOCOLS if kind == "portforward" else ws_handlers.REMOTECOMMAND_PROTOCOLS
        protocol = ws_handlers.negotiate(request, supported)
        if protocol is None:
            raise web.HTTPForbidden(text=f"requested protocol(s) are not supported; supports {supported}")
        log = self._log.bind(**_context(bound), transport="websocket", protocol=protocol)
        if isinstance(bound, PortForwardRequest):
            ports = bound.ports
            raw_ports = parse_qs(request.query_string).get("port", [])
            if raw_ports:
                try:
                    ports = [int(p) for v in raw_ports for p in v.split(",")]
                    for p in ports:
                        if not 0 < p < 65536 or (bound.ports and p not in bound.ports):
                            raise ValueError(f"port {p} not allowed")
                except ValueError as e:
                    raise web.HTTPBadRequest(text=f"invalid port query parameter: {e}") from None
            if not ports:
                raise web.HTTPBadRequest(text="query parameter \"port\" is required")
            coro = ws_handlers.serve_portforward(request, bound, ports, protocol, self._backend, log)
        else:
            coro = ws_handlers.serve_remotecommand(request, bound, protocol, self._backend, log)
        task = self._spawn(coro)
        try:
            return await task
        finally:
            task.cancel()


def _check_io(what: str, container_id: str, tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    if not container_id:
        raise InvalidArgument(f"{what}.container_id must not be empty")
    if not (stdin or stdout or stderr):
        raise InvalidArgument(f"{what}: one of stdin, stdout or stderr must be set")
    if tty and stderr:
        raise InvalidArgument(f"{what}: tty and stderr cannot both be true (a terminal has one output)")


def _context(request: StreamRequest) -> dict[str, str]:
    if isinstance(request, PortForwardRequest):
        return {"pod_id": request.pod_id, "session": "portforward"}
    return {"container_id": request.container_id, "session": request.kind}


def _plain(code: int, reason: str, body: str, extra_headers: str = "") -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(data)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n").encode() + data
