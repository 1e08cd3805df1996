"""shimd/cri/h2_server.py against h2's client connection as the peer (h2 checks what we send)."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from shimd.cri import h2_server
from shimd.cri.h2_server import ServerConnection

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/runtime.v1.RuntimeService/Version"),
           (":authority", "localhost"), ("te", "trailers"), ("content-type", "application/grpc"),
           ("grpc-timeout", "9999m")]


def _pair(**client_settings: int) -> tuple[ServerConnection, h2.connection.H2Connection]:
    """A server set up as shimd's protocol does, and a client that has finished the handshake."""
    server = ServerConnection()
    server.initiate_connection()
    server.increment_flow_control_window((4 << 20) - 65535)
    server.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 4 << 20})
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="ascii"))
    client.initiate_connection()
    if client_settings:
        client.update_settings({getattr(SettingCodes, k): v for k, v in client_settings.items()})
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return server, client


def _with_request(end_stream: bool = False, **client_settings: int) -> tuple[ServerConnection,
                                                                          h2.connection.H2Connection]:
    """A handshaken pair with the client's request headers on stream 1 taken in by the server."""
    server, client = _pair(**client_settings)
    client.send_headers(1, REQUEST, end_stream=end_stream)
    _exchange(server, client)
    return server, client


def _exchange(server: ServerConnection, client: h2.connection.H2Connection) -> list[h2.events.Event]:
    """Client output to the server; the server's events."""
    return server.receive_data(client.data_to_send())


def _to_client(server: ServerConnection, client: h2.connection.H2Connection) -> list[h2.events.Event]:
    return client.receive_data(server.data_to_send())


def test_handshake_advertises_windows_and_limits() -> None:
    server, client = _pair()
    assert client.remote_settings.max_concurrent_streams == h2_server.MAX_CONCURRENT_STREAMS
    assert client.remote_settings.initial_window_size == 4 << 20
    assert client.outbound_flow_control_window == 4 << 20  # 65535 plus the connection's increment
    assert server.local_settings.initial_window_size == 4 << 20


def test_unary_call_round_trip() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\0\0\0\0\0", end_stream=True)
    events = _exchange(server, client)
    kinds = [type(e) for e in events]
    assert kinds == [h2.events.RequestReceived, h2.events.DataReceived, h2.events.StreamEnded]
    assert events[0].headers == REQUEST
    assert events[1].data == b"\0\0\0\0\0" and events[1].flow_controlled_length == 5
    assert events[1].stream_ended is events[2]
    assert 1 in server.streams and not server.streams[1].open

    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc+proto")])
    server.send_data(1, b"\0\0\0\0\2hi")
    server.send_headers(1, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
    got = _to_client(server, client)
    assert [type(e) for e in got] == [h2.events.ResponseReceived, h2.events.DataReceived,
                                      h2.events.TrailersReceived, h2.events.StreamEnded]
    assert got[0].headers == [(":status", "200"), ("content-type", "application/grpc+proto")]
    assert got[2].headers == [("grpc-status", "0"), ("grpc-message", "")]
    assert 1 not in server.streams  # closed both ways: forgotten
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.send_headers(1, [("grpc-status", "0")])


def test_header_encoding_is_stateless_and_exact() -> None:
    fields = [("grpc-status", "13"), ("grpc-message", "x" * 300 + "é"), (":status", "200"),
              ("content-type", "application/grpc"), ("x-custom-bin", "AAEC"), ("long-" + "n" * 200, "v")]
    block = b"".join(h2_server.encode_field(n, v) for n, v in fields)
    decoder = hpack.Decoder()
    assert decoder.decode(block) == fields
    assert decoder.decode(block) == fields  # nothing was added to the peer's dynamic table
    assert len(decoder.header_table.dynamic_entries) == 0
    assert h2_server.encode_field(":status", "200") == b"\x88"  # static table, fully indexed


def test_many_calls_with_changing_timeouts_keep_hpack_in_step() -> None:
    server, client = _pair()
    for i in range(200):
        sid = 2 * i + 1
        client.send_headers(sid, [*REQUEST[:-1], ("grpc-timeout", f"{1000 + i}m")], end_stream=True)
        events = _exchange(server, client)
        assert events[0].headers[-1] == ("grpc-timeout", f"{1000 + i}m")
        server.send_headers(sid, [(":status", "200")])
        server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        _to_client(server, client)
    assert server.streams == {}


def _headers_frame(stream_id: int, block: bytes) -> bytes:
    return h2_server._frame(h2_server.HEADERS, h2_server.END_HEADERS | h2_server.END_STREAM, stream_id, block)


def test_repeated_indexed_blocks_decode_as_hpack_does_after_the_table_changes() -> None:
    """The decoded-block cache against hpack's own decoder, fed the same blocks (the reference)."""
    server, _ = _pair()
    encoder, reference = hpack.Encoder(), hpack.Decoder()
    sid = 1

    def send(block: bytes) -> None:
        nonlocal sid
        events = server.receive_data(_headers_frame(sid, block))
        assert events[0].headers == reference.decode(block)
        sid += 2

    first = encoder.encode([*REQUEST, ("x-a", "1")])
    indexed = encoder.encode([*REQUEST, ("x-a", "1")])  # every field now in the client's table
    assert h2_server.indexed_only(indexed) and not h2_server.indexed_only(first)
    send(first)
    send(indexed)
    send(indexed)  # from the cache
    # A new field enters the table in front: the same indexed bytes now name other fields.
    send(encoder.encode([("x-b", "2")]))
    send(indexed)
    send(encoder.encode([("x-c", "3")], huffman=False))
    send(indexed)
    # A table size update (the client shrinks its table): entries go, the old indices name nothing.
    encoder.header_table_size = 0
    send(encoder.encode([(":method", "POST")]))
    with pytest.raises(h2.exceptions.ProtocolError):
        server.receive_data(_headers_frame(sid, indexed))


def test_indexed_only_reads_multibyte_indices() -> None:
    encoder = hpack.Encoder()
    fields = [(f"x-{i}", "v") for i in range(200)]
    encoder.encode(fields)
    block = encoder.encode([fields[119]])  # dynamic index 62 + 80: over the 7-bit prefix
    assert block[0] == 0xFF and len(block) > 1
    assert h2_server.indexed_only(block)
    assert h2_server.indexed_only(block + b"\x82")
    assert not h2_server.indexed_only(block + b"\x40")  # then a literal with incremental indexing
    assert not h2_server.indexed_only(block[:-1] + bytes([block[-1] | 0x80]))  # index never ends
    assert not h2_server.indexed_only(b"\x80")  # index 0 is a decoding error, left to hpack
    assert not h2_server.indexed_only(b"\x3f\xe1\x1f")  # a table size update


def test_large_message_waits_for_window_and_frames_fit() -> None:
    server, client = _with_request(end_stream=True, INITIAL_WINDOW_SIZE=20000)
    server.send_headers(1, [(":status", "200")])
    assert server.local_flow_control_window(1) == 20000
    assert server.max_outbound_frame_size == 16384
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        server.send_data(1, b"x" * 16385)
    server.send_data(1, b"a" * 16384)
    with pytest.raises(h2.exceptions.FlowControlError):
        server.send_data(1, b"b" * 5000)
    server.send_data(1, b"b" * 3616)
    assert server.local_flow_control_window(1) == 0
    got = _to_client(server, client)
    received = sum(len(e.data) for e in got if isinstance(e, h2.events.DataReceived))
    assert received == 20000
    client.acknowledge_received_data(received, 1)
    client.increment_flow_control_window(5000, stream_id=1)
    events = _exchange(server, client)
    assert any(isinstance(e, h2.events.WindowUpdated) and e.stream_id == 1 for e in events)
    assert server.local_flow_control_window(1) >= 5000


def test_peer_settings_change_windows_and_frame_size() -> None:
    server, client = _with_request(end_stream=True)
    before = server.local_flow_control_window(1)
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000, SettingCodes.MAX_FRAME_SIZE: 32768})
    events = _exchange(server, client)
    changed = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    assert SettingCodes.INITIAL_WINDOW_SIZE in changed.changed_settings
    assert server.streams[1].send_window == before - 65535 + 1000
    assert server.max_outbound_frame_size == 32768
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in _to_client(server, client))


def test_smaller_header_table_is_acknowledged_in_the_next_block() -> None:
    server, client = _with_request(end_stream=True, HEADER_TABLE_SIZE=0)
    server.send_headers(1, [(":status", "200")])
    wire = server.data_to_send()
    assert wire[9:10] == b"\x20"  # dynamic table size update to 0, then the fields
    assert client.receive_data(wire)[0].headers == [(":status", "200")]


def test_continuation_both_ways() -> None:
    server, client = _pair()
    big = [("x-meta-" + str(i), "v" * 400) for i in range(60)]  # a block above 16 KiB
    client.send_headers(1, REQUEST + big, end_stream=True)
    events = _exchange(server, client)
    assert events[0].headers == REQUEST + big
    server.send_headers(1, [(":status", "200"), *big])
    got = _to_client(server, client)
    assert got[0].headers == [(":status", "200"), *big]


def test_padded_frames_and_priority_flag() -> None:
    server, _ = _pair()
    block = hpack.Encoder().encode(REQUEST)
    # HEADERS with PADDED and PRIORITY: pad length, 5 priority bytes, block, padding.
    payload = bytes([3]) + b"\0\0\0\0\x10" + block + b"\0\0\0"
    frame = struct.pack(">I", len(payload))[1:] + bytes([1, 0x4 | 0x8 | 0x20]) + struct.pack(">I", 1) + payload
    data = bytes([2]) + b"\0\0\0\0\0" + b"\0\0"
    frame += struct.pack(">I", len(data))[1:] + bytes([0, 0x1 | 0x8]) + struct.pack(">I", 1) + data
    events = server.receive_data(frame)
    assert events[0].headers == REQUEST
    assert events[1].data == b"\0\0\0\0\0" and events[1].flow_controlled_length == len(data)


def test_frames_split_anywhere_are_reassembled() -> None:
    server, client = _pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\0\0\0\0\3abc", end_stream=True)
    wire = client.data_to_send()
    events = []
    for i in range(len(wire)):
        events += server.receive_data(wire[i : i + 1])
    assert [type(e) for e in events] == [h2.events.RequestReceived, h2.events.DataReceived, h2.events.StreamEnded]


def test_ping_is_answered() -> None:
    server, client = _pair()
    client.ping(b"12345678")
    events = _exchange(server, client)
    assert isinstance(events[0], h2.events.PingReceived) and events[0].ping_data == b"12345678"
    got = _to_client(server, client)
    assert isinstance(got[0], h2.events.PingAckReceived) and got[0].ping_data == b"12345678"
    server.ping(b"abcdefgh")
    _to_client(server, client)
    assert isinstance(_exchange(server, client)[0], h2.events.PingAckReceived)


def test_client_reset_and_goaway() -> None:
    server, client = _with_request()
    client.reset_stream(1, ErrorCodes.CANCEL)
    events = _exchange(server, client)
    assert isinstance(events[0], h2.events.StreamReset)
    assert events[0].remote_reset and events[0].error_code == ErrorCodes.CANCEL
    assert 1 not in server.streams
    client.close_connection()
    events = _exchange(server, client)
    assert isinstance(events[0], h2.events.ConnectionTerminated)
    assert server.state_machine.state is h2.connection.ConnectionState.CLOSED


def test_server_reset_reaches_client() -> None:
    server, client = _with_request()
    server.reset_stream(1, ErrorCodes.CANCEL)
    got = _to_client(server, client)
    assert isinstance(got[0], h2.events.StreamReset) and got[0].error_code == ErrorCodes.CANCEL
    with pytest.raises(h2.exceptions.StreamClosedError):
        server.reset_stream(1)


def test_streams_beyond_the_limit_are_refused() -> None:
    server, client = _pair()
    for i in range(h2_server.MAX_CONCURRENT_STREAMS):
        client.send_headers(2 * i + 1, REQUEST)
    _exchange(server, client)
    assert len(server.streams) == h2_server.MAX_CONCURRENT_STREAMS
    # h2's client keeps to the limit itself; a peer that does not is answered with REFUSED_STREAM.
    block = hpack.Encoder().encode(REQUEST)
    sid = 2 * h2_server.MAX_CONCURRENT_STREAMS + 1
    frame = struct.pack(">I", len(block))[1:] + bytes([1, 0x4]) + struct.pack(">I", sid) + block
    assert server.receive_data(frame) == []
    assert server.data_to_send() == struct.pack(">I", 4)[1:] + bytes([3, 0]) + struct.pack(">II", sid, 7)


def test_data_on_closed_stream_gives_the_window_back() -> None:
    server, _ = _with_request()
    server.reset_stream(1)
    server.data_to_send()
    frame = struct.pack(">I", 10)[1:] + bytes([0, 0]) + struct.pack(">I", 1) + b"z" * 10
    for _ in range(3):
        assert server.receive_data(frame * 100_000) == []  # 3 MB in all: over half the 4 MiB window
    updates = [(sid, body) for kind, _, sid, body in _frames(server.data_to_send()) if kind == 8]
    assert updates and all(sid == 0 for sid, _ in updates)  # for the connection, not the dead stream
    assert sum(struct.unpack(">I", body)[0] for _, body in updates) >= 2 << 20


def _frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(wire):
        length, kind, flags, sid = int.from_bytes(wire[pos : pos + 3], "big"), wire[pos + 3], wire[pos + 4], \
            int.from_bytes(wire[pos + 5 : pos + 9], "big")
        out.append((kind, flags, sid, wire[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


@pytest.mark.parametrize("wire, error", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2.exceptions.ProtocolError),
    (h2_server.PREFACE + struct.pack(">I", 20000)[1:] + b"\0\0\0\0\0\1", h2.exceptions.FrameTooLargeError),
    (h2_server.PREFACE + b"\0\0\4\x08\0\0\0\0\0\0\0\0\0", h2.exceptions.ProtocolError),  # WINDOW_UPDATE of 0
    (h2_server.PREFACE + b"\0\0\5\x06\0\0\0\0\0" + b"x" * 5, h2.exceptions.FrameTooLargeError),  # PING of 5
    (h2_server.PREFACE + b"\0\0\0\x01\x05\0\0\0\2", h2.exceptions.ProtocolError),  # even stream id
    (h2_server.PREFACE + b"\0\0\0\x09\x04\0\0\0\1", h2.exceptions.ProtocolError),  # stray CONTINUATION
    (h2_server.PREFACE + b"\0\0\6\x04\0\0\0\0\0\0\5\0\0\0\1", h2.exceptions.ProtocolError),  # frame size 1
    (h2_server.PREFACE + b"\0\0\3\x01\x05\0\0\0\1\xff\xff\xff", h2.exceptions.ProtocolError),  # bad hpack
])
def test_protocol_errors_end_the_connection_with_goaway(wire: bytes, error: type[Exception]) -> None:
    server = ServerConnection()
    server.initiate_connection()
    server.data_to_send()
    with pytest.raises(error):
        server.receive_data(wire)
    out = server.data_to_send()
    assert out[3] == 7  # GOAWAY
    assert server.state_machine.state is h2.connection.ConnectionState.CLOSED


def test_endless_continuation_is_refused() -> None:
    server, _ = _pair()
    server.data_to_send()
    server.receive_data(b"\0\0\0\x01\0\0\0\0\1")  # HEADERS without END_HEADERS
    chunk = b"\0\x40\0\x09\0\0\0\0\1" + b"\0" * 16384
    with pytest.raises(h2.exceptions.ProtocolError):
        for _ in range(100):
            server.receive_data(chunk)
    assert server.data_to_send()[3] == 7


def test_unknown_frame_types_and_priority_frames_are_ignored() -> None:
    server, _ = _pair()
    assert server.receive_data(b"\0\0\3\x0a\0\0\0\0\0abc") == []
    assert server.receive_data(b"\0\0\5\x02\0\0\0\0\3" + b"\0" * 5) == []
