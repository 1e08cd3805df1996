"""SPDY/3.1 framing in shimd.streaming.spdy_frames, checked against the test client's own encoding."""

from __future__ import annotations

import struct
import zlib

import pytest

from shimd.streaming import spdy_frames as sf
from shimd.streaming.server import StreamingServer
from tests.support import spdy_client as client
from tests.support.streaming_fixtures import BUSYBOX, eventually


def test_dictionary_matches_spec_table() -> None:
    assert sf.HEADER_DICTIONARY == client.SPDY3_DICTIONARY
    assert len(sf.HEADER_DICTIONARY) == 1423


def test_header_blocks_share_one_zlib_stream_per_direction() -> None:
    codec = sf.HeaderCodec()
    # Peer -> us: the peer's compressor, flushed per block, decoded block by block.
    peer = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, client.SPDY3_DICTIONARY)
    for i in range(3):
        raw = struct.pack(">I", 2) + b"".join(
            struct.pack(">I", len(x)) + x for x in (b"streamtype", b"data", b"port", str(8000 + i).encode()))
        block = peer.compress(raw) + peer.flush(zlib.Z_SYNC_FLUSH)
        assert codec.decode(block) == {"streamtype": ["data"], "port": [str(8000 + i)]}
    # Us -> peer.
    inflate = zlib.decompressobj(zdict=client.SPDY3_DICTIONARY)
    for _ in range(2):
        raw = inflate.decompress(codec.encode({"X-Multi": ["a", "b"]}))
        assert raw == struct.pack(">I", 1) + struct.pack(">I", 7) + b"x-multi" + struct.pack(">I", 3) + b"a\x00b"


def test_bad_header_block_is_a_protocol_error() -> None:
    with pytest.raises(sf.SpdyProtocolError):
        sf.HeaderCodec().decode(b"definitely not zlib")


def test_control_frames_round_trip() -> None:
    codec = sf.HeaderCodec()
    for frame, kind in ((sf.window_update(5, 1000), sf.WINDOW_UPDATE), (sf.rst_stream(3, sf.CANCEL), sf.RST_STREAM),
                        (sf.ping(7), sf.PING), (sf.goaway(9, 0), sf.GOAWAY),
                        (sf.settings({sf.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}), sf.SETTINGS)):
        is_control, got_kind, flags, length = sf.split_header(frame[:8])
        assert is_control and got_kind == kind and length == len(frame) - 8
        f = sf.parse_control(codec, got_kind, flags, frame[8:])
        if kind == sf.WINDOW_UPDATE:
            assert (f.stream_id, f.delta) == (5, 1000)
        elif kind == sf.RST_STREAM:
            assert (f.stream_id, f.status) == (3, sf.CANCEL)
        elif kind == sf.PING:
            assert f.ping_id == 7
        elif kind == sf.GOAWAY:
            assert f.stream_id == 9
        else:
            assert f.settings == {sf.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}
    data = sf.data_frame(11, b"abc", fin=True)
    assert sf.split_header(data[:8]) == (False, 11, sf.FLAG_FIN, 3)
    with pytest.raises(sf.SpdyProtocolError):
        sf.split_header(struct.pack(">HHI", 0x8002, 1, 0))  # SPDY/2


async def test_session_answers_ping_and_rejects_bad_stream_ids(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "sleep", "5"], False, False, True, False)
    c = await client.SpdyClient.connect(url, ["v4.channel.k8s.io"])
    try:
        c.ping(41)
        c.next_id = 2  # even ids belong to the server
        bad = await c.open_stream({"streamType": "error"}, wait_reply=False)
        await eventually(lambda: client.CTRL_PING in c.frames_seen and bad.reset_status is not None, 5)
        assert bad.reset_status == sf.PROTOCOL_ERROR
    finally:
        await c.close()


async def test_settings_initial_window_and_small_windows_respected(streaming_server: StreamingServer) -> None:
    """A peer announcing a small initial window gets data only as fast as it reopens it."""
    url = streaming_server.exec_url("c1", [BUSYBOX, "head", "-c", "300000", "/dev/zero"], False, False, True, False)
    c = await client.SpdyClient.connect(url, ["v4.channel.k8s.io"])
    try:
        c._write(client._ctrl(client.CTRL_SETTINGS, 0, struct.pack("!III", 1, 7, 1000)))
        c.update_threshold = 500
        err = await c.open_stream({"streamType": "error"})
        out = await c.open_stream({"streamType": "stdout"})
        for st in (err, out):  # our advertised window for these streams is 1000 now
            st.recv_window = 1000
        got = await out.read_all(30)
        assert len(got) == 300000 and c.window_violations == 0
        assert b"Success" in await err.read_all(30)
    finally:
        await c.close()
