"""Interop with a real Go client: kubectl (moby/spdystream for SPDY, gorilla for WebSocket).

A tiny stand-in API server answers kubectl's pod GET and discovery, and turns each exec/portforward
upgrade into a token URL on StreamingServer (as kubelet's redirect would), then pipes bytes both ways.
Skipped when kubectl is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_asyncio

from shimd.streaming.server import StreamingServer
from tests.support.streaming_fixtures import BUSYBOX

KUBECTL = shutil.which("kubectl")
# client-go starts reading the WebSocket before it has registered its streams, so the empty "session is
# up" message a server sends first (kubelet's does too) is sometimes dropped with this klog line.
# Nothing is lost: that message carries no data. Any other stderr still fails the comparisons.
_KUBECTL_EARLY_MESSAGE = re.compile(rb"^E\d{4} [\d:. ]+\d+ websocket\.go:\d+\] Unknown stream id \d+, "
                                    rb"discarding message\n", re.M)
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
       "spec": {"containers": [{"name": "c", "image": "busybox"}]}, "status": {"phase": "Running"}}
DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "verbs": ["get", "list"],
         "shortNames": ["po"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions", "verbs": ["create"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions",
         "verbs": ["create"]}]},
}


class FakeApiServer:
    def __init__(self, streaming: StreamingServer) -> None:
        self.streaming = streaming
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *rest = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
            url = urlsplit(target)
            q = parse_qs(url.query)
            if url.path.endswith("/exec") or url.path.endswith("/portforward"):
                if url.path.endswith("/exec"):
                    flag = lambda k: q.get(k, ["false"])[0] == "true"  # noqa: E731
                    tty = flag("tty")
                    dest = self.streaming.exec_url("c", q["command"], tty, flag("stdin"), flag("stdout"),
                                                   flag("stderr") and not tty)
                else:
                    dest = self.streaming.portforward_url("p", [])
                d = urlsplit(dest)
                up_r, up_w = await asyncio.open_connection(d.hostname, d.port)
                up_w.write(f"{method} {d.path}?{url.query} {version}\r\n".encode() + "\r\n".join(rest).encode())
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
                return
            body = json.dumps(POD if url.path.endswith("/pods/p") else DISCOVERY.get(url.path, {})).encode()
            status = "200 OK" if url.path.endswith("/pods/p") or url.path in DISCOVERY else "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        w.close()


@pytest_asyncio.fixture(loop_scope="function")
async def kubeconfig(streaming_server: StreamingServer, tmp_path: Path) -> AsyncIterator[str]:
    api = FakeApiServer(streaming_server)
    await api.start()
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t", "namespace": "default"}}],
        "users": [{"name": "t", "user": {}}]}))
    try:
        yield str(cfg)
    finally:
        await api.close()


async def kubectl(cfg: str, *args: str, stdin: bytes = b"", websockets: bool = False,
                  timeout: float = 60) -> tuple[int, bytes, bytes]:
    env = {**os.environ, "KUBECONFIG": cfg, "HOME": str(Path(cfg).parent),
           "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": str(websockets).lower(),
           "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(KUBECTL, *args, env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, _KUBECTL_EARLY_MESSAGE.sub(b"", err)


@pytest.mark.parametrize("websockets", [False, True], ids=["spdy", "websocket-v5"])
async def test_kubectl_exec(kubeconfig: str, websockets: bool) -> None:
    rc, out, err = await kubectl(kubeconfig, "exec", "p", "--", BUSYBOX, "sh", "-c", "echo hi; echo oops >&2",
                                 websockets=websockets)
    assert (rc, out, err) == (0, b"hi\n", b"oops\n")
    rc, out, err = await kubectl(kubeconfig, "exec", "p", "--", BUSYBOX, "sh", "-c", "exit 3", websockets=websockets)
    assert rc == 3, err
    data = os.urandom(5 * 1024 * 1024)
    rc, out, err = await kubectl(kubeconfig, "exec", "-i", "p", "--", BUSYBOX, "cat", stdin=data,
                                 websockets=websockets)
    assert rc == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()


async def test_kubectl_port_forward_spdy(kubeconfig: str, streaming_server: StreamingServer, tmp_path: Path) -> None:
    body = os.urandom(1024 * 1024)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    pod = await asyncio.start_server(serve, "127.0.0.1", 0)
    remote = pod.sockets[0].getsockname()[1]
    env = {**os.environ, "KUBECONFIG": kubeconfig, "HOME": str(tmp_path), "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(KUBECTL, "port-forward", "p", f":{remote}", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()  # "Forwarding from 127.0.0.1:LOCAL -> REMOTE"
        local = int(line.split(b"->")[0].rsplit(b":", 1)[1])
        for _ in range(3):  # several connections through one SPDY session
            r, w = await asyncio.open_connection("127.0.0.1", local)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(30):
                resp = await r.read()
            w.close()
            assert resp.split(b"\r\n\r\n", 1)[1] == body
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        pod.close()
