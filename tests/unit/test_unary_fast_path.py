"""shimd/cri/unary.py answers as grpclib does: the same requests, fast path on and off, give the same wire answer.

A client (h2's client side) talks to the server's protocol in memory; what it receives per stream (response
headers, message bytes, trailers, resets) must be identical with the fast path on and with grpclib alone.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from h2.settings import SettingCodes

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.cri import dispatch, grpc_server
from tests.support.transport import RecordingTransport, fast_path_calls

TIMEOUT = 10.0
RUNTIME = "/runtime.v1.RuntimeService/"
MAX_MESSAGE = 1000
BIG = 3000  # containers in the large answer: ~200 KB, past the client's 64 KiB window

_ERRORS: dict[str, BaseException] = {
    "invalid": errors.InvalidArgument("bad id"),
    "notfound": errors.NotFound("no such container"),
    "exists": errors.AlreadyExists("already there"),
    "precondition": errors.FailedPrecondition("not now"),
    "deadline": errors.DeadlineExceeded("too slow"),
    "exhausted": errors.ResourceExhausted("full"),
    "unavailable": errors.Unavailable("later"),
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "oserror": OSError(errno.EIO, "I/O error"),
    "crash": RuntimeError("bug % with ünïcode\n"),
}


class _Service(cri.RuntimeServiceBase):
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(version=version_request.version or "0.1.0", runtime_name="fast-test")

    async def container_status(self, container_status_request: cri.ContainerStatusRequest
                               ) -> cri.ContainerStatusResponse:
        raise _ERRORS[container_status_request.container_id]

    async def list_containers(self, list_containers_request: cri.ListContainersRequest
                              ) -> cri.ListContainersResponse:
        return cri.ListContainersResponse(containers=[
            cri.Container(id=f"{i:064x}", pod_sandbox_id=f"{i:064x}", image_ref="busybox") for i in range(BIG)])

    async def stop_pod_sandbox(self, stop_pod_sandbox_request: cri.StopPodSandboxRequest
                               ) -> cri.StopPodSandboxResponse:
        if stop_pod_sandbox_request.pod_sandbox_id == "slow":
            await self._slow()
        elif stop_pod_sandbox_request.pod_sandbox_id in _ERRORS:
            raise _ERRORS[stop_pod_sandbox_request.pod_sandbox_id]
        await asyncio.sleep(0)
        return cri.StopPodSandboxResponse()

    async def pod_sandbox_status(self, pod_sandbox_status_request: cri.PodSandboxStatusRequest
                                 ) -> cri.PodSandboxStatusResponse:
        await self._slow()
        return cri.PodSandboxStatusResponse()

    async def _slow(self) -> None:
        self.entered.set()
        try:
            await asyncio.sleep(TIMEOUT * 3)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def _framed(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _headers(path: str, **extra: str) -> list[tuple[str, str]]:
    headers = {":method": "POST", ":scheme": "http", ":path": path, ":authority": "localhost",
               "content-type": "application/grpc", "te": "trailers", "user-agent": "test"}
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return [(k, v) for k, v in headers.items() if v]


class _Client:
    """One connection to a server protocol in memory, driven by h2's client side."""

    def __init__(self, fast: bool, window: int | None = None) -> None:
        self.service = _Service()
        self.server = grpc_server.Server([dispatch.Wrapped(self.service, MAX_MESSAGE)], unary_fast_path=fast)
        self.proto = self.server._protocol_factory()
        self.transport = RecordingTransport()
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.seen: dict[int, list[tuple[str, Any]]] = {}
        self.ended: set[int] = set()
        self._send()

    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.proto.data_received(data)

    def _receive(self) -> None:
        corked = self.proto.connection._transport
        corked.flush()
        data, self.transport.writes = b"".join(self.transport.writes), []
        if not data:
            return
        for event in self.h2.receive_data(data):
            sid = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.ResponseReceived):
                self.seen.setdefault(sid, []).append(("headers", event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.seen.setdefault(sid, []).append(("data", event.data))
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                self.seen.setdefault(sid, []).append(("trailers", event.headers))
            elif isinstance(event, h2.events.StreamReset):
                self.seen.setdefault(sid, []).append(("reset", event.error_code))
                self.ended.add(sid)
            if isinstance(event, h2.events.StreamEnded):
                self.ended.add(sid)
        self._send()

    def request(self, headers: list[tuple[str, str]], body: bytes | None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.h2.send_data(sid, body, end_stream=True)
        self._send()
        return sid

    def reset(self, sid: int) -> None:
        self.h2.reset_stream(sid)
        self._send()

    async def answer(self, sid: int) -> list[tuple[str, Any]]:
        async with asyncio.timeout(TIMEOUT):
            while sid not in self.ended:
                await asyncio.sleep(0.001)
                self._receive()
        events = self.seen.pop(sid)
        # The message may come in several DATA frames: what counts is the bytes, joined.
        out: list[tuple[str, Any]] = []
        for kind, value in events:
            if kind == "data" and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + value)
            else:
                out.append((kind, value))
        return out

    async def close(self) -> None:
        self.proto.connection_lost(None)
        for handler in self.server._handlers:
            handler.close()
        for task in self.server._unary_tasks:
            task.cancel()
        async with asyncio.timeout(TIMEOUT):
            for handler in self.server._handlers:
                await handler.wait_closed()
            if self.server._unary_tasks:
                await asyncio.wait(set(self.server._unary_tasks))


def _requests() -> list[tuple[str, list[tuple[str, str]], bytes | None]]:
    version = bytes(cri.VersionRequest(version="v1"))
    out: list[tuple[str, list[tuple[str, str]], bytes | None]] = [
        ("ok", _headers(RUNTIME + "Version"), _framed(version)),
        ("ok-empty-body", _headers(RUNTIME + "Version"), _framed(b"")),
        ("ok-proto-content-type", _headers(RUNTIME + "Version", content_type="application/grpc+proto"),
         _framed(version)),
        ("ok-timeout", _headers(RUNTIME + "Version", grpc_timeout="5S"), _framed(version)),
        ("ok-metadata", _headers(RUNTIME + "Version", x_trace="abc", x_trace_bin="AAEC"), _framed(version)),
        ("bad-bytes", _headers(RUNTIME + "Version"), _framed(b"\x0a\xff\xff\xff")),
        ("wrong-wire-type", _headers(RUNTIME + "Version"), _framed(b"\x08\x01")),
        ("truncated-prefix", _headers(RUNTIME + "Version"), b"\x00\x00\x00"),
        ("short-body", _headers(RUNTIME + "Version"), b"\x00\x00\x00\x00\x09ab"),
        ("no-body", _headers(RUNTIME + "Version"), None),
        ("compressed", _headers(RUNTIME + "Version"), b"\x01" + _framed(version)[1:]),
        ("too-large", _headers(RUNTIME + "Version"), _framed(bytes(cri.VersionRequest(version="x" * 2000)))),
        ("unknown-method", _headers(RUNTIME + "NoSuchCall"), _framed(b"")),
        ("bad-content-type", _headers(RUNTIME + "Version", content_type="application/json"), _framed(version)),
        ("no-te", _headers(RUNTIME + "Version", te=""), _framed(version)),
        ("bad-timeout", _headers(RUNTIME + "Version", grpc_timeout="soon"), _framed(version)),
        ("get", _headers(RUNTIME + "Version", **{":method": "GET"}), _framed(version)),
        ("deadline", _headers(RUNTIME + "PodSandboxStatus", grpc_timeout="20m"), _framed(b"")),
        ("large-answer", _headers(RUNTIME + "ListContainers"), _framed(b"")),
        # A method dispatch does not start in place: a task from the start, the deadline kept by _run.
        ("task-ok", _headers(RUNTIME + "StopPodSandbox", grpc_timeout="5S"),
         _framed(bytes(cri.StopPodSandboxRequest(pod_sandbox_id="p")))),
        ("task-error", _headers(RUNTIME + "StopPodSandbox"),
         _framed(bytes(cri.StopPodSandboxRequest(pod_sandbox_id="notfound")))),
        ("task-deadline", _headers(RUNTIME + "StopPodSandbox", grpc_timeout="20m"),
         _framed(bytes(cri.StopPodSandboxRequest(pod_sandbox_id="slow")))),
    ]
    for name in _ERRORS:
        body = bytes(cri.ContainerStatusRequest(container_id=name))
        out.append((f"error-{name}", _headers(RUNTIME + "ContainerStatus"), _framed(body)))
    return out


async def _answers(fast: bool, window: int | None = None) -> dict[str, list[tuple[str, Any]]]:
    client = _Client(fast, window)
    try:
        answers = {}
        for name, headers, body in _requests():
            answers[name] = await client.answer(client.request(headers, body))
        return answers
    finally:
        await client.close()


async def test_fast_path_answers_as_grpclib_does(monkeypatch: pytest.MonkeyPatch) -> None:
    served = fast_path_calls(monkeypatch)
    reference = await _answers(fast=False)
    assert not served
    fast = await _answers(fast=True)
    assert served, "the fast path served nothing"
    for name in reference:
        assert fast[name] == reference[name], name
    # The answers checked are the ones meant: a status for each, the message where there is one.
    trailers = {name: dict(events[-1][1]) for name, events in reference.items()}
    assert trailers["ok"]["grpc-status"] == "0"
    assert trailers["deadline"]["grpc-status"] == trailers["task-deadline"]["grpc-status"] == "4"
    assert trailers["task-ok"]["grpc-status"] == "0"
    assert trailers["unknown-method"]["grpc-status"] == "12"
    assert trailers["too-large"]["grpc-status"] == "8"
    assert trailers["bad-bytes"]["grpc-status"] == "3"
    assert trailers["error-notfound"]["grpc-status"] == "5"
    assert len(reference["large-answer"][1][1]) > 65535


async def test_large_answer_follows_a_small_client_window() -> None:
    reference = await _answers(fast=False, window=1000)
    fast = await _answers(fast=True, window=1000)
    assert fast == reference


_SLOW = [("PodSandboxStatus", b""), ("StopPodSandbox", bytes(cri.StopPodSandboxRequest(pod_sandbox_id="slow")))]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(("method", "body"), _SLOW, ids=["in-place", "task"])
async def test_client_reset_cancels_the_handler(fast: bool, method: str, body: bytes) -> None:
    client = _Client(fast)
    try:
        sid = client.request(_headers(RUNTIME + method), _framed(body))
        async with asyncio.timeout(TIMEOUT):
            await client.service.entered.wait()
        client.reset(sid)
        async with asyncio.timeout(TIMEOUT):
            await client.service.cancelled.wait()
        client._receive()
        assert sid not in client.seen  # nothing answered on a stream the client reset
        # The connection goes on serving.
        assert (await client.answer(client.request(_headers(RUNTIME + "Version"), _framed(b""))))[-1] == (
            "trailers", [("grpc-status", "0")])
    finally:
        await client.close()


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(("method", "body"), _SLOW, ids=["in-place", "task"])
async def test_connection_loss_cancels_in_flight_handlers(fast: bool, method: str, body: bytes) -> None:
    client = _Client(fast)
    try:
        client.request(_headers(RUNTIME + method), _framed(body))
        async with asyncio.timeout(TIMEOUT):
            await client.service.entered.wait()
        client.transport.closed = True
        client.proto.connection_lost(None)
        async with asyncio.timeout(TIMEOUT):
            await client.service.cancelled.wait()
    finally:
        await client.close()


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize(("method", "body"), _SLOW, ids=["in-place", "task"])
async def test_server_close_cancels_calls_and_waits_for_them(tmp_path: Path, fast: bool, method: str,
                                                             body: bytes) -> None:
    service = _Service()
    server = grpc_server.Server([dispatch.Wrapped(service)], unary_fast_path=fast)
    socket = str(tmp_path / "grpc.sock")
    await server.start(path=socket)

    def call() -> grpc.StatusCode:
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            try:
                # grpclib's close leaves the connection open with nothing to say on it: the client's
                # deadline ends the call (the server's cancelling is what is checked).
                channel.unary_unary(RUNTIME + method)(body, timeout=TIMEOUT / 2)
            except grpc.RpcError as e:
                return e.code()  # type: ignore[attr-defined,no-any-return]
        return grpc.StatusCode.OK

    client = asyncio.create_task(asyncio.to_thread(call))
    try:
        async with asyncio.timeout(TIMEOUT):
            await service.entered.wait()
    finally:
        server.close()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_closed()
    assert service.cancelled.is_set()
    assert not server._unary_tasks
    async with asyncio.timeout(TIMEOUT * 3):
        assert await client != grpc.StatusCode.OK
