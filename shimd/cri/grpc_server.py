"""grpclib's server, with four changes.

* One socket write per response instead of three. grpclib hands a response's headers, message and
  trailers to the transport one by one, and uvloop writes each at once: three write(2) calls, each
  waking a client that waits on the other CPU (in a VM, an interrupt through the hypervisor). Here
  the writes of one event-loop turn are joined and written together, as Go's HTTP/2 server does
  with its buffered writer. Measured on Version: about 8% less CPU per call in shimd and 5% less
  latency (three alternating 4000-call runs with and without).
* HTTP/2 is h2_server's connection instead of h2's (see there why).
* A method shimd does not know is answered UNIMPLEMENTED as an ordinary response. grpclib answers it
  with headers that lack content-type, which grpc-go (kubelet, ctr) turns into UNKNOWN "missing
  content-type field": kubelet tells a method a runtime lacks by UNIMPLEMENTED, for newer CRI calls.

Every place shimd reaches into grpclib below its public API is in this module, and each has a test in
tests/unit/test_grpclib_hooks.py that fails when grpclib changes what it relies on; grpclib, h2 and
hpack are pinned in pyproject.toml to the versions those tests passed with. The hooks:
* Server._protocol_factory (what Server.start gives the event loop) and H2Protocol's handler, config
  and h2_config attributes;
* Server._mapping, the method table grpclib's request handler looks paths up in with .get();
* H2Protocol.connection_made, redone here as grpclib does it, with grpclib's Connection and
  EventsProcessor; through them grpclib calls h2_server.ServerConnection as it would h2's connection;
* Stream.recv_message, replaced on one stream (replace_recv_message) to map undecodable requests;
* for the unary path (unary.py, below): grpclib's Connection.flush and write_ready and
  EventsProcessor.process, handed to it as a unary.Wire; and what it repeats of grpclib's request
  handler and Stream (which requests reach a method, the headers and trailers of an answer).

* Unary calls of the usual kind skip grpclib's per-call machinery (unary.UnaryCalls, see there): about
  42% of the daemon's CPU for a small call was grpclib's request handler, Stream, metadata, events and
  deadline wrapper. Streaming calls and anything unusual go to grpclib as before.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpclib.server
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from shimd.cri import h2_server, unary


class CorkedTransport:
    """Delegates to a transport, holding writes until the end of the current event-loop turn."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ServerProtocol(H2Protocol):
    """grpclib's protocol on h2_server's connection, writing through a CorkedTransport; unary calls of
    the usual kind are taken from grpclib's events by unary.UnaryCalls when the server has it on."""

    unary: unary.UnaryCalls | None = None
    unary_setup: tuple[dict[str, Handler], set[asyncio.Task[None]], int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # grpclib's own set-up, with h2_server's connection in place of h2's; the socket is a unix
        # socket, so grpclib's TCP_NODELAY step has nothing to do.
        conn = h2_server.ServerConnection()
        conn.initiate_connection()
        initial = conn.local_settings.initial_window_size
        if self.config.http2_connection_window_size != initial:
            conn.increment_flow_control_window(self.config.http2_connection_window_size - initial)
        if self.config.http2_stream_window_size != initial:
            conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size})
        corked = CorkedTransport(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        self.connection = Connection(conn, corked, config=self.config)  # type: ignore[arg-type]
        self.connection.flush()
        self.connection.initialize()
        self.processor = EventsProcessor(self.handler, self.connection)
        if self.unary_setup is not None:
            methods, tasks, max_message = self.unary_setup
            wire = unary.Wire(h2=conn, send=self.connection.flush, push=corked.flush, closing=transport.is_closing,
                              write_ready=self.connection.write_ready, to_grpclib=self.processor.process)
            self.unary = unary.UnaryCalls(methods, wire, tasks, max_message)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.unary is not None:
            self.unary.close()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            # grpclib closes without flushing: the GOAWAY saying why (FLOW_CONTROL_ERROR, ENHANCE_YOUR_CALM)
            # would never reach the client.
            self.connection.flush()
            if self.unary is not None:
                self.unary.close()
            self.processor.close("Protocol error")
            return
        self.connection.flush()
        fast = self.unary
        for event in events:
            if fast is None or not fast.take(event):
                self.processor.process(event)
        self.connection.flush()


class _Methods(dict[str, Handler]):
    """grpclib's method table, answering every path it does not hold as an unimplemented method."""

    def get(self, key: str, default: Any = None) -> Handler:  # type: ignore[override]
        known = super().get(key)
        if known is not None:
            return known

        async def unknown(stream: grpclib.server.Stream) -> None:
            raise GRPCError(Status.UNIMPLEMENTED, f"{key}: unknown method, not implemented by shimd")

        return Handler(unknown, Cardinality.UNARY_UNARY, None, None)


class Server(grpclib.server.Server):
    def __init__(self, handlers: Iterable[Any], *, unary_fast_path: bool = True) -> None:
        """unary_fast_path=False leaves every call to grpclib: for the tests that compare the two."""
        services = list(handlers)
        super().__init__(services)
        self._mapping = _Methods(self._mapping)
        self._unary_tasks: set[asyncio.Task[None]] = set()
        self._unary_setup: tuple[dict[str, Handler], set[asyncio.Task[None]], int] | None = None
        if unary_fast_path:
            limit = min((getattr(s, "max_message", unary.MAX_BUFFERED) for s in services), default=0)
            self._unary_setup = (unary.unary_methods(dict(self._mapping)), self._unary_tasks, limit)

    def close(self) -> None:
        super().close()
        for task in self._unary_tasks:  # as grpclib cancels its handlers' tasks
            task.cancel()

    async def wait_closed(self) -> None:
        await super().wait_closed()
        if self._unary_tasks:
            await asyncio.wait(set(self._unary_tasks))

    async def start_on(self, sock: socket.socket) -> None:
        """Serve on a unix socket already bound and listening (SocketGuard.bind gives it its mode)."""
        if self._server is not None:
            raise RuntimeError("server is already started")
        self._server = await self._loop.create_unix_server(self._protocol_factory, sock=sock)
        self._server_closed_fut = self._loop.create_future()

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own bookkeeping of handlers is kept; only the protocol around the handler is ours.
        plain = super()._protocol_factory()
        proto = _ServerProtocol(plain.handler, plain.config, plain.h2_config)
        proto.unary_setup = self._unary_setup
        return proto


def replace_recv_message(stream: grpclib.server.Stream, recv: Callable[[], Awaitable[Any]]) -> None:
    """Makes recv the stream's recv_message, which the generated service handlers call for the request."""
    stream.recv_message = recv  # type: ignore[method-assign]
