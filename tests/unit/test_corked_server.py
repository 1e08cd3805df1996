"""shimd/cri/corked_server.py: one write per event-loop turn, and grpclib's protocol still built its way."""

from __future__ import annotations

import asyncio
from typing import Any

from shimd.cri import corked_server


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return f"info:{name}"


async def test_writes_of_one_turn_reach_the_socket_as_one() -> None:
    raw = _RecordingTransport()
    t = corked_server.CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"headers|")
    t.write(b"")
    t.write(b"message|")
    t.write(b"trailers")
    assert raw.writes == []  # nothing before the turn ends
    await asyncio.sleep(0)
    assert raw.writes == [b"headers|message|trailers"]
    t.write(b"next")
    t.close()  # pending data goes out before the close
    assert raw.writes[-1] == b"next" and raw.closed
    assert t.get_extra_info("peername") == "info:peername"  # everything else is the transport's


async def test_protocol_factory_wraps_grpclib_protocol() -> None:
    server = corked_server.Server([])
    proto = server._protocol_factory()
    assert isinstance(proto, corked_server._CorkedH2Protocol)
    assert proto.handler in server._handlers  # grpclib still tracks the handler it made
