"""Port-forward over SPDY/3.1 and WebSocket to real local HTTP servers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from shimd.streaming import spdy_frames as sf
from shimd.streaming.server import StreamingServer
from tests.support.spdy_client import SpdyClient
from tests.support.streaming_fixtures import LocalBackend, eventually
from tests.support.ws_client import ChannelClient

PAYLOAD_SIZE = 3 * 1024 * 1024


def _serve(body: bytes):  # type: ignore[no-untyped-def]
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body)
    return handler


@pytest_asyncio.fixture(loop_scope="function")
async def http_servers() -> AsyncIterator[list[tuple[int, bytes]]]:
    """Two HTTP servers on free 127.0.0.1 ports, each serving its own random /file."""
    runners, out = [], []
    for _ in range(2):
        body = os.urandom(PAYLOAD_SIZE)
        app = web.Application()
        app.router.add_get("/file", _serve(body))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        out.append((port, body))
    try:
        yield out
    finally:
        for r in runners:
            await r.cleanup()


def _http_get() -> bytes:
    return b"GET /file HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n"


def _body_of(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return body


async def _spdy_fetch(client: SpdyClient, port: int, request_id: int) -> tuple[bytes, bytes]:
    headers = {"port": str(port), "requestID": str(request_id)}
    error = await client.open_stream({"streamType": "error", **headers})
    error.close()  # kubectl closes its side of the error stream at once
    data = await client.open_stream({"streamType": "data", **headers})
    await data.write(_http_get())
    body, err = await asyncio.gather(data.read_all(30), error.read_all(30))
    return body, err


async def test_spdy_portforward_several_ports_at_once(streaming_server: StreamingServer,
                                                      http_servers: list[tuple[int, bytes]],
                                                      local_backend: LocalBackend) -> None:
    ports = [p for p, _ in http_servers]
    url = streaming_server.portforward_url("pod-1", ports)
    client = await SpdyClient.connect(url, ["portforward.k8s.io"])
    try:
        assert client.protocol == "portforward.k8s.io"
        results = await asyncio.gather(*(_spdy_fetch(client, p, i) for i, (p, _) in enumerate(http_servers * 2)))
        for (resp, err), (_, body) in zip(results, http_servers * 2, strict=True):
            assert err == b""
            assert hashlib.sha256(_body_of(resp)).digest() == hashlib.sha256(body).digest()
        assert client.window_violations == 0
        assert sorted(local_backend.dialed) == sorted(ports * 2)
        # A port outside the request is refused on the error stream, not dialled.
        resp, err = await _spdy_fetch(client, 1, 99)
        assert resp == b"" and b"error forwarding port 1 to pod pod-1" in err
    finally:
        await client.close()
    await eventually(lambda: not streaming_server.live_sessions, 5)


async def test_spdy_portforward_refused_port_reports_error(streaming_server: StreamingServer) -> None:
    with __import__("socket").socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    client = await SpdyClient.connect(streaming_server.portforward_url("pod-1", []), ["portforward.k8s.io"])
    try:
        resp, err = await _spdy_fetch(client, free, 0)
        assert resp == b""
        assert f"error forwarding port {free} to pod pod-1".encode() in err
    finally:
        await client.close()


async def test_websocket_portforward_several_ports(streaming_server: StreamingServer,
                                                   http_servers: list[tuple[int, bytes]]) -> None:
    ports = [p for p, _ in http_servers]
    url = streaming_server.portforward_url("pod-1", ports) + "?" + "&".join(f"port={p}" for p in ports)
    client = await ChannelClient.connect(url, ["portforward.k8s.io"])
    try:
        assert client.protocol == "portforward.k8s.io"
        for i in range(len(ports)):
            await client.send(2 * i, _http_get())
        got = await client.collect(30)
    finally:
        await client.close()
    for i, (port, body) in enumerate(http_servers):
        data, err = got[2 * i], got[2 * i + 1]
        assert data[:2] == struct.pack("<H", port) and err == struct.pack("<H", port)
        assert hashlib.sha256(_body_of(data[2:])).digest() == hashlib.sha256(body).digest()


async def test_websocket_portforward_base64(streaming_server: StreamingServer,
                                            http_servers: list[tuple[int, bytes]]) -> None:
    port, body = http_servers[0]
    client = await ChannelClient.connect(streaming_server.portforward_url("pod-1", [port]),
                                         ["v4.base64.channel.k8s.io"])
    try:
        assert client.protocol == "v4.base64.channel.k8s.io"
        await client.send(0, _http_get())
        got = await client.collect(30)
    finally:
        await client.close()
    assert got[0][:2] == struct.pack("<H", port)
    assert _body_of(got[0][2:]) == body


async def test_spdy_portforward_client_disconnect_closes_pod_connection(streaming_server: StreamingServer) -> None:
    closed = asyncio.Event()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        await reader.read()  # returns once shimd closes its side
        closed.set()
        writer.close()

    pod = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = pod.sockets[0].getsockname()[1]
    try:
        client = await SpdyClient.connect(streaming_server.portforward_url("pod-1", [port]), ["portforward.k8s.io"])
        headers = {"port": str(port), "requestID": "0"}
        await client.open_stream({"streamType": "error", **headers})
        data = await client.open_stream({"streamType": "data", **headers})
        assert await data.read(timeout=10) == b"hello"
        client.writer.transport.abort()
        await client.close()
        async with asyncio.timeout(10):
            await closed.wait()
        await eventually(lambda: not streaming_server.live_sessions, 10)
    finally:
        pod.close()
        await pod.wait_closed()


async def test_spdy_portforward_bounds_forwards_per_session(streaming_server: StreamingServer,
                                                            local_backend: LocalBackend,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forward dials (a thread entering the pod's netns): a client opening pairs without end is refused
    past the bound instead of starting a dial, and a thread, for each."""
    from shimd.streaming import spdy_handlers

    limit, extra = 8, 3
    monkeypatch.setattr(spdy_handlers, "MAX_FORWARDS", limit, raising=False)
    release = asyncio.Event()
    inflight = peak = 0

    async def stuck_dial(pod_id: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        try:
            await release.wait()
            raise ConnectionRefusedError("test backend")
        finally:
            inflight -= 1

    monkeypatch.setattr(local_backend, "port_forward", stuck_dial)
    client = await SpdyClient.connect(streaming_server.portforward_url("pod-1", []), ["portforward.k8s.io"])
    try:
        pairs = []
        for i in range(limit + extra):
            headers = {"port": "80", "requestID": str(i)}
            error = await client.open_stream({"streamType": "error", **headers})
            data = await client.open_stream({"streamType": "data", **headers})
            pairs.append((error, data))
        await eventually(lambda: inflight == limit, 10)
        refused = [i for i, (error, data) in enumerate(pairs)
                   if error.reset_status == sf.REFUSED_STREAM and data.reset_status == sf.REFUSED_STREAM]
        assert refused == list(range(limit, limit + extra))
        assert peak == limit
    finally:
        release.set()
        await client.close()
    await eventually(lambda: not streaming_server.live_sessions, 10)
