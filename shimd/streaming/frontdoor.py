"""Connection entry point: read the HTTP request head, then route the connection.

aiohttp serves HTTP and WebSocket but has no hook for other Upgrade protocols, so SPDY/3.1
upgrades are taken here and everything else is handed, bytes and all, to aiohttp's protocol for
the same transport (asyncio's set_protocol is the supported way to switch protocols).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT_SECONDS = 30.0


@dataclass
class RequestHead:
    method: str
    path: str
    query: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def get_all(self, name: str) -> list[str]:
        """Every value of a header, across repeated lines and comma-separated lists."""
        return [v.strip() for line in self.headers.get(name.lower(), []) for v in line.split(",") if v.strip()]


def parse_head(raw: bytes) -> RequestHead | None:
    try:
        lines = raw.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return None
    url = urlsplit(target)
    head = RequestHead(method=method, path=url.path, query=url.query)
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            head.headers.setdefault(name.strip().lower(), []).append(value.strip())
    return head


def is_spdy_upgrade(head: RequestHead) -> bool:
    return (head.get("upgrade").lower().startswith("spdy/")
            and "upgrade" in [c.lower() for c in head.get_all("connection")])


class FrontDoor(asyncio.Protocol):
    def __init__(self, on_spdy: Callable[[asyncio.Transport, RequestHead, bytes], None],
                 http_protocol: Callable[[], asyncio.Protocol]) -> None:
        self._on_spdy, self._http_protocol = on_spdy, http_protocol
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports only duck-type asyncio.Transport, hence no isinstance check.
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self._transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                                      b"Content-Length: 0\r\n\r\n")
                self._transport.close()
            return
        if self._timer is not None:
            self._timer.cancel()
        head = parse_head(bytes(self._buf[:end]))
        if head is not None and is_spdy_upgrade(head):
            self._transport.pause_reading()
            self._on_spdy(self._transport, head, bytes(self._buf[end + 4:]))
            return
        proto = self._http_protocol()
        self._transport.set_protocol(proto)
        proto.connection_made(self._transport)
        proto.data_received(bytes(self._buf))

    def eof_received(self) -> bool | None:
        return None  # closes the transport: no complete request head arrived

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
