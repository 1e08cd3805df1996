"""ttrpc framing, the shim's ttrpc server and shimd's TaskClient, over real unix sockets.

The shim's server runs on the shim's own event loop (shims.common.aio) in a thread of its own; the
client side is shimd's, on asyncio, as in production."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shimd import errors
from shimd.api.containerd.task import v2 as task
from shimd.shimmgr.task_client import CallTimeout, TaskClient
from shimproto import messages as m
from shimproto import ttrpc
from shimproto.proto import decode, encode
from shims.common import aio
from shims.common.ttrpc_server import Server

ECHO = {1: ("text", "string", None), 2: ("delay_ms", "uint32", None)}


async def _echo(req: dict[str, Any]) -> dict[str, Any]:
    await aio.sleep(req["delay_ms"] / 1000)
    return {"text": req["text"].upper(), "delay_ms": req["delay_ms"]}


async def _fail(req: dict[str, Any]) -> dict[str, Any]:
    raise ttrpc.TtrpcError(ttrpc.NOT_FOUND, f"container {req['id']!r} not found")


async def _crash(req: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


async def _connect(req: dict[str, Any]) -> dict[str, Any]:
    return {"shim_pid": 42, "task_pid": 7, "version": req["id"]}


class ShimServer:
    """The shim's Server on an aio loop in a thread; close() stops it from the test's side."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[BaseException] = []
        self._ready = threading.Event()
        self._loop: aio.Loop | None = None
        self._stop: aio.Event | None = None
        self._thread = threading.Thread(target=aio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "shim server did not start"

    async def _main(self) -> None:
        svc = ttrpc.Service("test.Echo")
        svc.register("Echo", ECHO, ECHO, _echo)
        svc.register("Fail", m.CONNECT_REQUEST, m.EMPTY, _fail)
        svc.register("Crash", m.EMPTY, m.EMPTY, _crash)
        tsvc = ttrpc.Service(m.TASK_SERVICE)
        tsvc.register("Connect", m.CONNECT_REQUEST, m.CONNECT_RESPONSE, _connect)
        tsvc.register("State", m.STATE_REQUEST, m.STATE_RESPONSE, _fail)
        srv = Server([svc, tsvc], lambda what, e: self.errors.append(e))
        await srv.listen(self.path)
        self._loop, self._stop = aio.get_running_loop(), aio.Event()
        self._ready.set()
        await self._stop.wait()
        await srv.close()

    async def close(self) -> None:
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join, 5)
        assert not self._thread.is_alive()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ShimServer, str]]:
    path = str(tmp_path / "t.sock")
    srv = ShimServer(path)
    yield srv, path
    if srv._thread.is_alive():
        asyncio.run(srv.close())


def test_header_layout() -> None:
    frame = ttrpc.pack_frame(5, ttrpc.TYPE_REQUEST, b"abc")
    assert frame == b"\x00\x00\x00\x03" + b"\x00\x00\x00\x05" + b"\x01\x00" + b"abc"
    assert ttrpc.HEADER_LEN == 10


def test_response_envelope() -> None:
    assert ttrpc.decode_response(ttrpc.encode_response(b"xy")) == (ttrpc.OK, "", b"xy")
    assert ttrpc.decode_response(ttrpc.encode_response(code=ttrpc.NOT_FOUND, message="gone")) == (5, "gone", b"")


def test_oversized_frame_is_refused_when_packing() -> None:
    with pytest.raises(ttrpc.FrameTooLarge):
        ttrpc.pack_frame(1, ttrpc.TYPE_REQUEST, b"x" * (ttrpc.MAX_MESSAGE + 1))


async def _raw_call(path: str, frame: bytes, chunk: int = 0) -> tuple[int, int, bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        if chunk:
            for i in range(0, len(frame), chunk):
                writer.write(frame[i:i + chunk])
                await writer.drain()
                await asyncio.sleep(0.001)
        else:
            writer.write(frame)
        async with asyncio.timeout(5):
            sid, mtype, _, payload = await ttrpc.read_frame(reader)
        return sid, mtype, payload
    finally:
        writer.close()


async def test_fragmented_request_is_reassembled(server: tuple[ShimServer, str]) -> None:
    _, path = server
    req = ttrpc.encode_request("test.Echo", "Echo", encode(ECHO, {"text": "hello", "delay_ms": 0}))
    sid, mtype, payload = await _raw_call(path, ttrpc.pack_frame(3, ttrpc.TYPE_REQUEST, req), chunk=1)
    code, _, body = ttrpc.decode_response(payload)
    assert (sid, mtype, code) == (3, ttrpc.TYPE_RESPONSE, ttrpc.OK)
    assert decode(ECHO, body)["text"] == "HELLO"


async def test_fragmented_response_is_reassembled_by_client(tmp_path: Path) -> None:
    """A fake server that dribbles its answer out one byte at a time."""
    path = str(tmp_path / "slow.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid, _, _, _ = await ttrpc.read_frame(reader)
        resp = ttrpc.pack_frame(sid, ttrpc.TYPE_RESPONSE,
                                ttrpc.encode_response(bytes(task.ConnectResponse(shim_pid=99, version="v" * 300))))
        for i in range(len(resp)):
            writer.write(resp[i:i + 1])
            await writer.drain()
        await reader.read()

    srv = await asyncio.start_unix_server(handle, path)
    try:
        c = await TaskClient.connect(path, timeout=5)
        resp = await c.connect(task.ConnectRequest(id="p"), timeout=5)
        assert resp.shim_pid == 99 and resp.version == "v" * 300
        await c.close()
    finally:
        srv.close()


async def test_concurrent_streams_are_multiplexed(server: tuple[ShimServer, str]) -> None:
    _, path = server
    c = await TaskClient.connect(path, timeout=5)
    try:
        # Later calls finish first: answers must still reach the right caller.
        delays = [200, 150, 100, 50, 0, 120, 30]
        calls = [c.call("test.Echo", "Echo", encode(ECHO, {"text": f"m{i}", "delay_ms": d}), timeout=5)
                 for i, d in enumerate(delays)]
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*calls)
        elapsed = asyncio.get_running_loop().time() - started
        assert [decode(ECHO, r)["text"] for r in results] == [f"M{i}" for i in range(len(delays))]
        assert elapsed < 0.6  # served in parallel, not one after the other (sum is 0.65 s)
    finally:
        await c.close()


async def test_oversized_message_is_rejected_by_server(server: tuple[ShimServer, str]) -> None:
    _, path = server
    header = struct.pack(">IIBB", ttrpc.MAX_MESSAGE + 1, 7, ttrpc.TYPE_REQUEST, 0)
    sid, _, payload = await _raw_call(path, header)
    code, message, _ = ttrpc.decode_response(payload)
    assert sid == 7 and code == ttrpc.RESOURCE_EXHAUSTED and "exceeds" in message


async def test_oversized_request_is_refused_by_client(server: tuple[ShimServer, str]) -> None:
    _, path = server
    c = await TaskClient.connect(path, timeout=5)
    try:
        with pytest.raises(errors.ResourceExhausted):
            await c.call("test.Echo", "Echo", encode(ECHO, {"text": "x" * (ttrpc.MAX_MESSAGE + 10)}), timeout=5)
        # the connection is still usable
        assert (await c.connect(task.ConnectRequest(id="ok"), timeout=5)).version == "ok"
    finally:
        await c.close()


async def test_even_stream_id_is_refused(server: tuple[ShimServer, str]) -> None:
    _, path = server
    req = ttrpc.encode_request("test.Echo", "Echo", b"")
    sid, _, payload = await _raw_call(path, ttrpc.pack_frame(2, ttrpc.TYPE_REQUEST, req))
    assert sid == 2 and ttrpc.decode_response(payload)[0] == ttrpc.INVALID_ARGUMENT


async def test_status_codes_map_to_domain_errors(server: tuple[ShimServer, str]) -> None:
    _, path = server
    c = await TaskClient.connect(path, timeout=5)
    try:
        with pytest.raises(errors.NotFound, match="container 'zz' not found"):
            await c.state(task.StateRequest(id="zz"), timeout=5)
        with pytest.raises(errors.ShimdError) as ei:
            await c.call("test.Echo", "Nope", b"", timeout=5)
        assert ei.value.ttrpc_code == ttrpc.UNIMPLEMENTED  # type: ignore[attr-defined]
        with pytest.raises(errors.ShimdError, match="boom"):
            await c.call("test.Echo", "Crash", b"", timeout=5)
        resp = await c.connect(task.ConnectRequest(id="v1"), timeout=5)
        assert (resp.shim_pid, resp.task_pid, resp.version) == (42, 7, "v1")
    finally:
        await c.close()


async def test_call_timeout_is_deadline_exceeded_and_timeout_error(server: tuple[ShimServer, str]) -> None:
    _, path = server
    c = await TaskClient.connect(path, timeout=5)
    try:
        with pytest.raises(CallTimeout) as ei:
            await c.call("test.Echo", "Echo", encode(ECHO, {"text": "x", "delay_ms": 2000}), timeout=0.1)
        assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, errors.DeadlineExceeded)
        assert not c.closed
    finally:
        await c.close()


async def test_vanished_server_is_unavailable(server: tuple[ShimServer, str], tmp_path: Path) -> None:
    srv, path = server
    c = await TaskClient.connect(path, timeout=5)
    pending = asyncio.ensure_future(c.call("test.Echo", "Echo", encode(ECHO, {"text": "x", "delay_ms": 5000}),
                                           timeout=10))
    await asyncio.sleep(0.05)
    await srv.close()
    with pytest.raises(errors.Unavailable):
        await pending
    assert c.closed
    with pytest.raises(errors.Unavailable):
        await c.connect(task.ConnectRequest(id="x"), timeout=1)
    await c.close()
    with pytest.raises(errors.Unavailable):
        await TaskClient.connect(str(tmp_path / "missing.sock"), timeout=1)
