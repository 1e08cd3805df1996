"""grpclib's server with one socket write per response instead of three.

grpclib hands a response's headers, message and trailers to the transport one by one, and uvloop
writes each at once: three write(2) calls, each waking a client that waits on the other CPU (in a VM,
an interrupt through the hypervisor). Here the writes of one event-loop turn are joined and written
together, as Go's HTTP/2 server does with its buffered writer. Measured on Version: about 8% less CPU
per call in shimd and 5% less latency (three alternating 4000-call runs with and without).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.server
from grpclib.protocol import H2Protocol


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


class _CorkedH2Protocol(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CorkedTransport(transport, asyncio.get_running_loop()))  # type: ignore[arg-type]


class Server(grpclib.server.Server):
    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own bookkeeping of handlers is kept; only the protocol's transport is wrapped.
        plain = super()._protocol_factory()
        return _CorkedH2Protocol(plain.handler, plain.config, plain.h2_config)
