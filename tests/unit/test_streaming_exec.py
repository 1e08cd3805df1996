"""Exec/attach over SPDY/3.1 against StreamingServer with a backend running real local processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from shimd.errors import InvalidArgument
from shimd.streaming.server import StreamingServer
from tests.support.spdy_client import SpdyClient, UpgradeRejected, open_remotecommand, run_remotecommand
from tests.support.streaming_fixtures import BUSYBOX, LocalBackend, eventually

SH = [BUSYBOX, "sh", "-c"]


async def test_exec_echo_success_status(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "echo", "hello"], tty=False, stdin=False, stdout=True, stderr=True)
    assert url.startswith(streaming_server.base_url + "/exec/")
    res = await run_remotecommand(url)
    assert res.stdout == b"hello\n"
    assert res.stderr == b""
    assert res.status_json == {"metadata": {}, "status": "Success"}


async def test_exec_nonzero_exit_code_in_v4_status(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [*SH, "echo oops >&2; exit 3"], False, False, True, True)
    res = await run_remotecommand(url)
    assert res.stderr == b"oops\n"
    st = res.status_json
    assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
    assert st["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    assert str(st["message"]).startswith("command terminated with non-zero exit code")


@pytest.mark.parametrize("proto", ["v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"])
async def test_exec_older_protocols_report_errors_as_text(streaming_server: StreamingServer, proto: str) -> None:
    url = streaming_server.exec_url("c1", [*SH, "echo hi; exit 5"], False, False, True, True)
    res = await run_remotecommand(url, protocols=("v5.channel.k8s.io", proto))
    assert res.stdout == b"hi\n"
    assert b"non-zero exit code" in res.status and b"5" in res.status
    ok = streaming_server.exec_url("c1", [BUSYBOX, "true"], False, False, True, True)
    assert (await run_remotecommand(ok, protocols=(proto,))).status == b""


async def test_protocol_negotiation_picks_v4_and_rejects_unknown(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", [BUSYBOX, "true"], False, False, True, True)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io", "v3.channel.k8s.io"])
    assert client.protocol == "v4.channel.k8s.io"
    await client.close()
    url = streaming_server.exec_url("c1", [BUSYBOX, "true"], False, False, True, True)
    with pytest.raises(UpgradeRejected) as e:
        await SpdyClient.connect(url, ["v9.channel.k8s.io"])
    assert e.value.status == 403
    assert "v4.channel.k8s.io" in e.value.headers["x-accepted-stream-protocol-versions"]


@pytest.mark.parametrize("flow_control", [True, False], ids=["spdy31-flow-control", "spdystream-style"])
async def test_stdin_round_trip_10mb(streaming_server: StreamingServer, flow_control: bool) -> None:
    data = os.urandom(10 * 1024 * 1024)
    url = streaming_server.exec_url("c1", [BUSYBOX, "cat"], tty=False, stdin=True, stdout=True, stderr=True)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"], flow_control=flow_control)
    try:
        s = await open_remotecommand(client, stdin=True, stdout=True, stderr=True, tty=False)

        async def feed() -> None:
            await s["stdin"].write(data)
            s["stdin"].close()

        async with asyncio.timeout(60):
            _, out, status = await asyncio.gather(feed(), s["stdout"].read_all(60), s["error"].read_all(60))
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
        assert json.loads(status)["status"] == "Success"
        if flow_control:
            assert client.window_violations == 0
    finally:
        await client.close()


async def test_tty_resize_seen_by_stty(streaming_server: StreamingServer) -> None:
    script = "while read x; do stty size; done"
    url = streaming_server.exec_url("c1", [*SH, script], tty=True, stdin=True, stdout=True, stderr=False)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    try:
        s = await open_remotecommand(client, stdin=True, stdout=True, stderr=False, tty=True)
        assert "resize" in s and "stderr" not in s
        await s["resize"].write(json.dumps({"Width": 123, "Height": 45}).encode())
        seen = b""
        async with asyncio.timeout(20):
            while b"45 123" not in seen:
                await s["stdin"].write(b"\n")
                seen += await s["stdout"].read(timeout=20)
            await s["resize"].write(b'{"Width":80,"Height":24}{"Width":81,"Height":25}')
            while b"25 81" not in seen:
                await s["stdin"].write(b"\n")
                seen += await s["stdout"].read(timeout=20)
        s["stdin"].close()
        assert json.loads(await s["error"].read_all())["status"] == "Success"
    finally:
        await client.close()


async def test_attach(streaming_server: StreamingServer, local_backend: LocalBackend) -> None:
    local_backend.containers["ctr"] = [BUSYBOX, "sh", "-c", "cat; echo done >&2"]
    url = streaming_server.attach_url("ctr", tty=False, stdin=True, stdout=True, stderr=True)
    assert "/attach/" in url
    res = await run_remotecommand(url, stdin_data=b"attached\n")
    assert res.stdout == b"attached\n"
    assert res.stderr == b"done\n"
    assert res.status_json["status"] == "Success"


async def test_tokens_single_use_kind_bound_and_expiring(local_backend: LocalBackend) -> None:
    from shimd.config import StreamingConfig

    server = StreamingServer(StreamingConfig(address="127.0.0.1:0", token_ttl_seconds=0.3), local_backend)
    await server.start()
    try:
        url = server.exec_url("c1", [BUSYBOX, "true"], False, False, True, False)
        assert (await run_remotecommand(url, stderr=False)).status_json["status"] == "Success"
        with pytest.raises(UpgradeRejected) as e:
            await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        assert e.value.status == 404  # reused
        url = server.exec_url("c1", [BUSYBOX, "true"], False, False, True, False)
        with pytest.raises(UpgradeRejected) as e:
            await SpdyClient.connect(url.replace("/exec/", "/attach/"), ["v4.channel.k8s.io"])
        assert e.value.status == 404  # an exec token does not open an attach
        with pytest.raises(UpgradeRejected) as e:
            await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        assert e.value.status == 404  # ...and that attempt consumed it
        url = server.exec_url("c1", [BUSYBOX, "true"], False, False, True, False)
        await asyncio.sleep(0.5)
        with pytest.raises(UpgradeRejected) as e:
            await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        assert e.value.status == 404  # expired
        with pytest.raises(UpgradeRejected) as e:
            await SpdyClient.connect(server.base_url + "/exec/made-up-token", ["v4.channel.k8s.io"])
        assert e.value.status == 404
    finally:
        await server.close()


async def test_url_validation(streaming_server: StreamingServer) -> None:
    with pytest.raises(InvalidArgument, match="tty and stderr"):
        streaming_server.exec_url("c1", ["x"], tty=True, stdin=False, stdout=True, stderr=True)
    with pytest.raises(InvalidArgument, match="cmd"):
        streaming_server.exec_url("c1", [], tty=False, stdin=False, stdout=True, stderr=False)
    with pytest.raises(InvalidArgument, match="one of stdin"):
        streaming_server.attach_url("c1", tty=False, stdin=False, stdout=False, stderr=False)
    with pytest.raises(InvalidArgument, match="container_id"):
        streaming_server.attach_url("", tty=False, stdin=False, stdout=True, stderr=False)
    with pytest.raises(InvalidArgument, match="port"):
        streaming_server.portforward_url("pod", [70000])


async def test_client_disconnect_kills_process_and_leaves_no_task(streaming_server: StreamingServer,
                                                                  local_backend: LocalBackend) -> None:
    before = asyncio.all_tasks()
    url = streaming_server.exec_url("c1", [BUSYBOX, "sleep", "300"], False, True, True, True)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    await open_remotecommand(client, stdin=True, stdout=True, stderr=True, tty=False)
    await eventually(lambda: local_backend.alive(), 10)
    client.writer.transport.abort()  # vanish without a goodbye
    await client.close()
    await eventually(lambda: not (local_backend.alive() or streaming_server.live_sessions), 10)
    assert local_backend.cancelled == 1
    await asyncio.sleep(0.1)
    leftovers = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert leftovers == []


async def test_twenty_concurrent_execs(streaming_server: StreamingServer) -> None:
    async def one(i: int) -> bytes:
        url = streaming_server.exec_url(f"c{i}", [*SH, f"echo session-{i}; echo err-{i} >&2"], False, False, True, True)
        res = await run_remotecommand(url, timeout=60)
        assert res.stderr == f"err-{i}\n".encode()
        assert res.status_json["status"] == "Success"
        return res.stdout

    outs = await asyncio.gather(*(one(i) for i in range(20)))
    assert outs == [f"session-{i}\n".encode() for i in range(20)]
    await eventually(lambda: not streaming_server.live_sessions, 5)


async def test_close_cancels_live_sessions(local_backend: LocalBackend) -> None:
    from shimd.config import StreamingConfig

    server = StreamingServer(StreamingConfig(address="127.0.0.1:0"), local_backend)
    await server.start()
    url = server.exec_url("c1", [BUSYBOX, "sleep", "300"], False, False, True, False)
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    try:
        await open_remotecommand(client, stdin=False, stdout=True, stderr=False, tty=False)
        await eventually(lambda: local_backend.alive(), 10)
        async with asyncio.timeout(15):
            await server.close()
        assert local_backend.alive() == [] and server.live_sessions == 0
    finally:
        await client.close()


async def test_backend_failure_becomes_failure_status(streaming_server: StreamingServer) -> None:
    url = streaming_server.exec_url("c1", ["/nonexistent/binary"], False, False, True, True)
    res = await run_remotecommand(url)
    st = res.status_json
    assert st["status"] == "Failure" and st["reason"] == "InternalError"
    assert "/nonexistent/binary" in str(st["message"])
