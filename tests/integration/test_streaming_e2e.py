"""ExecSync, Exec, Attach and PortForward against real runc containers, through the CRI and the tests'
own SPDY and WebSocket clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import grpc
import pytest

from tests.support.runtime import Runtime
from tests.support.spdy_client import SpdyClient, open_remotecommand, run_remotecommand, run_tty_resized
from tests.support.ws_client import ChannelClient


def _running_pod(rt: Runtime, name: str, command: list[str], **kw: object) -> tuple[str, str]:
    pod_id, pod_cfg = rt.run_pod(name)
    cid = rt.create(pod_id, pod_cfg, "main", command, **kw)
    rt.start(cid)
    rt.wait_state(cid, rt.pb.CONTAINER_RUNNING)
    return pod_id, cid


def test_exec_sync_output_exit_code_and_timeout(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "execsync", ["sleep", "1000"])
    res = r.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)
    res = r.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/hostname"]))
    assert res.stdout.strip() == b"execsync" and res.exit_code == 0

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        r.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "123"], timeout=1))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 10
    # The timed-out process was killed, not left behind.
    ps = r.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["ps"])).stdout.decode()
    assert "sleep 123" not in ps

    with pytest.raises(grpc.RpcError) as e:
        r.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=[]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        r.ExecSync(pb.ExecSyncRequest(container_id="0" * 64, cmd=["true"]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_exec_spdy_and_websocket(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "execstream", ["sleep", "1000"])

    url = r.Exec(pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "echo hi; echo oops >&2; exit 4"],
                                stdout=True, stderr=True)).url
    res = asyncio.run(run_remotecommand(url))
    assert res.stdout == b"hi\n" and res.stderr == b"oops\n"
    status = res.status_json
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"][0]["message"] == "4"  # type: ignore[index]

    # stdin round trip of 10 MB
    data = os.urandom(10 * 1024 * 1024)
    url = r.Exec(pb.ExecRequest(container_id=cid, cmd=["cat"], stdin=True, stdout=True, stderr=True)).url
    res = asyncio.run(run_remotecommand(url, stdin_data=data, timeout=120))
    assert len(res.stdout) == len(data), (len(res.stdout), res.stderr[:200], res.status)
    assert hashlib.sha256(res.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    assert json.loads(res.status)["status"] == "Success"

    # A used token is gone.
    with pytest.raises(Exception) as e:
        asyncio.run(run_remotecommand(url))
    assert "404" in str(e.value) or getattr(e.value, "status", None) == 404

    async def ws() -> dict[int, bytes]:
        url = r.Exec(pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "echo ws; exit 2"], stdout=True,
                                    stderr=True)).url
        client = await ChannelClient.connect(url, ["v5.channel.k8s.io", "v4.channel.k8s.io"])
        try:
            return await client.collect(30)
        finally:
            await client.close()

    got = asyncio.run(ws())
    assert got[1] == b"ws\n"
    assert json.loads(got[3])["details"]["causes"][0]["message"] == "2"


def test_exec_tty_resize(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "tty", ["sleep", "1000"])

    url = r.Exec(pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "sleep 1; stty size"], tty=True,
                                stdout=True)).url
    assert b"37 91" in asyncio.run(run_tty_resized(url, 91, 37))


def test_port_forward_to_httpd(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    pod_id, _ = _running_pod(rt, "pf", ["sh", "-c", "mkdir -p /www && echo forwarded-ok > /www/f.txt && "
                                              "exec httpd -f -p 8080 -h /www"])
    time.sleep(0.5)
    url = r.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[8080])).url

    async def go() -> bytes:
        client = await SpdyClient.connect(url, ["portforward.k8s.io"])
        try:
            err = await client.open_stream({"streamType": "error", "port": "8080", "requestID": "0"})
            data = await client.open_stream({"streamType": "data", "port": "8080", "requestID": "0"})
            await data.write(b"GET /f.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(30):
                body = await data.read_all(30)
            del err
            return body
        finally:
            await client.close()

    body = asyncio.run(go())
    assert b"200 OK" in body and b"forwarded-ok" in body


def test_attach_follows_output(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "attach", ["sh", "-c", "sleep 1; for i in 1 2 3; do echo line$i; done; "
                                                     "echo errline >&2; sleep 1"])
    url = r.Attach(pb.AttachRequest(container_id=cid, stdout=True, stderr=True)).url
    res = asyncio.run(run_remotecommand(url, timeout=30))
    assert res.stdout == b"line1\nline2\nline3\n"
    assert res.stderr == b"errline\n"
    with pytest.raises(grpc.RpcError) as e:
        r.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_attach_interactive_stdin_once(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "attach-in", ["sh"], stdin=True, stdin_once=True)
    url = r.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)).url
    res = asyncio.run(run_remotecommand(url, stdin_data=b"echo hello-from-attach\necho to-err >&2\nexit 5\n",
                                        timeout=30))
    assert res.stdout == b"hello-from-attach\n"
    assert res.stderr == b"to-err\n"
    st = rt.wait_state(cid, pb.CONTAINER_EXITED)
    assert st.exit_code == 5


def test_attach_tty_resize(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    _, cid = _running_pod(rt, "attach-tty", ["sh"], stdin=True, tty=True)

    async def go() -> bytes:
        url = r.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)).url
        client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
        try:
            s = await open_remotecommand(client, stdin=True, stdout=True, stderr=False, tty=True)
            await s["resize"].write(json.dumps({"Width": 77, "Height": 22}).encode())
            await asyncio.sleep(0.5)
            await s["stdin"].write(b"stty size; exit 0\n")
            async with asyncio.timeout(30):
                out, _ = await asyncio.gather(s["stdout"].read_all(30), s["error"].read_all(30))
            return out
        finally:
            await client.close()

    assert b"22 77" in asyncio.run(go())
    rt.wait_state(cid, pb.CONTAINER_EXITED)
