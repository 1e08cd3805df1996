"""TLS on the streaming server (streaming.tls_cert/tls_key), SPDY and WebSocket, also under uvloop."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
import uvloop

from shimd.config import StreamingConfig
from shimd.streaming.server import StreamingServer
from tests.support.spdy_client import SpdyClient, open_remotecommand
from tests.support.streaming_fixtures import BUSYBOX, LocalBackend


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return str(crt), str(key)


async def _exercise(crt: str, key: str) -> None:
    backend = LocalBackend()
    server = StreamingServer(StreamingConfig(address="127.0.0.1:0", tls_cert=crt, tls_key=key), backend)
    await server.start()
    try:
        assert server.base_url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=crt)
        url = server.exec_url("c1", [BUSYBOX, "sh", "-c", "cat; exit 4"], False, True, True, False)
        client = await SpdyClient.connect(url, ["v4.channel.k8s.io"], ssl_ctx=ctx)
        try:
            s = await open_remotecommand(client, stdin=True, stdout=True, stderr=False, tty=False)
            await s["stdin"].write(b"over tls\n" * 10000)
            s["stdin"].close()
            out, status = await asyncio.gather(s["stdout"].read_all(), s["error"].read_all())
        finally:
            await client.close()
        assert out == b"over tls\n" * 10000
        assert b"NonZeroExitCode" in status
        ws_url = server.exec_url("c1", [BUSYBOX, "echo", "ws"], False, False, True, False)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url.replace("https", "wss"), protocols=["v4.channel.k8s.io"], ssl=ctx)
            got = b""
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x01":
                    got += msg.data[1:]
            assert got == b"ws\n"
    finally:
        await server.close()


async def test_tls_spdy_and_websocket(cert: tuple[str, str]) -> None:
    await _exercise(*cert)


def test_tls_under_uvloop(cert: tuple[str, str]) -> None:
    # shimd's daemon may run on uvloop; protocol switching must work on its transports too.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(_exercise(*cert), 60))
