"""Exec/attach over the WebSocket channel protocols (v5/v4, base64 variants)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from shimd.streaming.server import StreamingServer
from tests.support.streaming_fixtures import BUSYBOX, LocalBackend, eventually
from tests.support.ws_client import ChannelClient, WsRejected, status_of

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4


async def test_v5_exec_stdin_close_and_exit_code(streaming_server: StreamingServer) -> None:
    data = os.urandom(2 * 1024 * 1024)
    url = streaming_server.exec_url("c1", [BUSYBOX, "sh", "-c", "cat; exit 7"], False, True, True, True)
    client = await ChannelClient.connect(url, ["v5.channel.k8s.io", "v4.channel.k8s.io"])
    try:
        assert client.protocol == "v5.channel.k8s.io"
        for i in range(0, len(data), 100_000):
            await client.send(STDIN, data[i:i + 100_000])
        await client.close_channel(STDIN)
        got = await client.collect(30)
    finally:
        await client.close()
    assert client.messages[0] == (STDOUT, b"")  # the "connection is up" signal
    assert hashlib.sha256(got[STDOUT]).digest() == hashlib.sha256(data).digest()
    st = status_of(got[ERROR])
    assert st["reason"] == "NonZeroExitCode"
    assert st["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}


@pytest.mark.parametrize("proto", ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"])
async def test_v4_exec_stdout_stderr_success(streaming_server: StreamingServer, proto: str) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "sh", "-c", "echo out; echo err >&2"], False, False, True, True)
    client = await ChannelClient.connect(url, [proto])
    try:
        assert client.protocol == proto
        got = await client.collect(30)
    finally:
        await client.close()
    assert got[STDOUT] == b"out\n" and got[STDERR] == b"err\n"
    assert status_of(got[ERROR]) == {"metadata": {}, "status": "Success"}


async def test_legacy_channel_protocol_text_status(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "sh", "-c", "exit 2"], False, False, True, False)
    client = await ChannelClient.connect(url, ["channel.k8s.io"])
    try:
        got = await client.collect(30)
    finally:
        await client.close()
    assert got[ERROR].startswith(b"command terminated with non-zero exit code")


async def test_tty_resize_over_websocket(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "sh", "-c", "while read x; do stty size; done"],
                                    True, True, True, False)
    client = await ChannelClient.connect(url, ["v5.channel.k8s.io"])
    try:
        await client.send(RESIZE, json.dumps({"Width": 99, "Height": 33}).encode())
        seen = b""
        async with asyncio.timeout(20):
            while b"33 99" not in seen:
                await client.send(STDIN, b"\n")
                item = await client.receive()
                assert item is not None
                seen += item[1] if item[0] == STDOUT else b""
        await client.close_channel(STDIN)
        got = await client.collect(30)
    finally:
        await client.close()
    assert status_of(got[ERROR])["status"] == "Success"


async def test_attach_over_websocket(streaming_server: StreamingServer, local_backend: LocalBackend) -> None:
    local_backend.containers["ctr"] = [BUSYBOX, "sh", "-c", "read line; echo got-$line"]
    client = await ChannelClient.connect(streaming_server.attach_url("ctr", False, True, True, False),
                                         ["v5.channel.k8s.io"])
    try:
        await client.send(STDIN, b"ping\n")
        got = await client.collect(30)
    finally:
        await client.close()
    assert got[STDOUT] == b"got-ping\n"
    assert status_of(got[ERROR])["status"] == "Success"


async def test_websocket_token_and_protocol_rejections(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "true"], False, False, True, False)
    with pytest.raises(WsRejected) as e:
        await ChannelClient.connect(url, ["v9.channel.k8s.io"])
    assert e.value.status == 403
    with pytest.raises(WsRejected) as e:
        await ChannelClient.connect(url, ["v4.channel.k8s.io"])
    assert e.value.status == 404  # consumed by the rejected attempt
    with pytest.raises(WsRejected) as e:
        await ChannelClient.connect(streaming_server.base_url + "/attach/nope", ["v4.channel.k8s.io"])
    assert e.value.status == 404


async def test_websocket_disconnect_kills_process(streaming_server: StreamingServer,
                                                  local_backend: LocalBackend) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "sleep", "300"], False, True, True, False)
    client = await ChannelClient.connect(url, ["v5.channel.k8s.io"])
    await eventually(lambda: local_backend.alive(), 10)
    await client.session.close()  # drops the TCP connection without a close handshake
    await eventually(lambda: not (local_backend.alive() or streaming_server.live_sessions), 10)
    assert local_backend.cancelled == 1
