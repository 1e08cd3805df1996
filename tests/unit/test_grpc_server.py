"""shimd/cri/grpc_server.py: one write per event-loop turn, h2_server under grpclib, and grpclib's handler kept."""

from __future__ import annotations

import asyncio

from shimd.cri import grpc_server, h2_server
from tests.support.transport import RecordingTransport


async def test_writes_of_one_turn_reach_the_socket_as_one() -> None:
    raw = RecordingTransport(lambda name: f"info:{name}")
    t = grpc_server.CorkedTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
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
    server = grpc_server.Server([])
    proto = server._protocol_factory()
    assert isinstance(proto, grpc_server._ServerProtocol)
    assert proto.handler in server._handlers  # grpclib still tracks the handler it made
    proto.connection_made(RecordingTransport())  # type: ignore[arg-type]
    assert isinstance(proto.connection._connection, h2_server.ServerConnection)
    assert proto.connection.create_stream(stream_id=1).id == 1
    settings = b"".join(RecordingTransport.writes_of(proto))
    assert settings[3] == 4  # the server's SETTINGS frame opens the connection
