"""Kubernetes protocols on top of a SPDY session: remotecommand (exec/attach) and portforward.

Stream roles come from the `streamType` header of each client-opened stream, as in kubelet:
error, stdin, stdout, stderr, resize for remotecommand; error/data pairs tied by `requestID` (and
`port`) for portforward.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from shimd.streaming import portforward, remotecommand
from shimd.streaming import spdy_frames as sf
from shimd.streaming.backend import StreamBackend, StreamIO
from shimd.streaming.spdy_session import SpdySession, SpdyStream
from shimd.streaming.tokens import AttachRequest, ExecRequest, PortForwardRequest
from shimd.streaming.util import wait_any

REMOTECOMMAND_PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
PORTFORWARD_PROTOCOLS = ["portforward.k8s.io"]
STREAM_CREATION_TIMEOUT = 30.0
_REMOTECOMMAND_TYPES = {"error", "stdin", "stdout", "stderr", "resize"}


class SpdyRemoteCommand:
    def __init__(self, request: ExecRequest | AttachRequest, protocol: str, backend: StreamBackend,
                 log: Any) -> None:
        self._req, self._protocol, self._backend, self._log = request, protocol, backend, log
        self.streams: dict[str, SpdyStream] = {}
        self._ready = asyncio.Event()
        self._required = {"error"}
        for name, wanted in (("stdin", request.stdin), ("stdout", request.stdout), ("stderr", request.stderr)):
            if wanted:
                self._required.add(name)
        if request.tty and protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io"):
            self._required.add("resize")
        self.session: SpdySession | None = None

    def on_stream(self, stream: SpdyStream) -> None:
        assert self.session is not None
        kind = stream.header("streamtype")
        if kind not in _REMOTECOMMAND_TYPES or kind in self.streams:
            self._log.warning("rejecting spdy stream", stream_type=kind)
            stream.reset(sf.PROTOCOL_ERROR)
            return
        self.session.reply(stream)
        self.streams[kind] = stream
        if kind not in ("stdin", "resize"):
            stream.discard()  # output-only from our side; a client writing here is ignored
        if self._required <= self.streams.keys():
            self._ready.set()

    async def run(self) -> None:
        assert self.session is not None
        if not await wait_any(self._ready, self.session.closed, timeout=STREAM_CREATION_TIMEOUT):
            self._log.warning("client did not open its streams in time", have=sorted(self.streams),
                              want=sorted(self._required))
            return
        if not self._ready.is_set():
            return
        req, s = self._req, self.streams
        helpers: list[asyncio.Task[None]] = []
        stdin = None
        if req.stdin:
            stdin, gate = remotecommand.new_stdin()
            helpers.append(asyncio.ensure_future(self._pump_stdin(s["stdin"], stdin, gate)))
        elif "stdin" in s:
            s["stdin"].discard()
        resize: asyncio.Queue[tuple[int, int]] | None = None
        if "resize" in s:
            if req.tty:
                resize = asyncio.Queue(maxsize=16)
                helpers.append(asyncio.ensure_future(self._pump_resize(s["resize"], resize)))
            else:
                s["resize"].discard()
        io = StreamIO(
            tty=req.tty, stdin=stdin,
            stdout=s["stdout"].write if req.stdout else None,
            stderr=s["stderr"].write if req.stderr else None,
            resize=resize,
        )

        async def write_status(body: bytes) -> None:
            self._close_outputs()  # clients stop reading once the error stream ends
            await s["error"].write(body)

        try:
            await remotecommand.run(req, self._backend, io, write_status,
                                    self._protocol == "v4.channel.k8s.io", self.session.closed, self._log)
            self._close_outputs()
            s["error"].close()
        finally:
            for t in helpers:
                t.cancel()
            if helpers:
                await asyncio.wait(helpers, timeout=5)

    def _close_outputs(self) -> None:
        for name in ("stdout", "stderr"):
            if name in self.streams:
                self.streams[name].close()

    async def _pump_stdin(self, stream: SpdyStream, reader: asyncio.StreamReader,
                          gate: remotecommand.FlowGate) -> None:
        assert self.session is not None
        alive = lambda: not self.session.closed.is_set()  # noqa: E731
        try:
            while chunk := await stream.read():
                reader.feed_data(chunk)
                if not await gate.wait(alive):
                    break
        finally:
            reader.feed_eof()

    async def _pump_resize(self, stream: SpdyStream, queue: asyncio.Queue[tuple[int, int]]) -> None:
        decoder = remotecommand.ResizeDecoder(queue, self._log)
        while chunk := await stream.read():
            decoder.feed(chunk)


class _Pair:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.data: SpdyStream | None = None
        self.error: SpdyStream | None = None
        self.timer: asyncio.TimerHandle | None = None


# Forwards in flight (and pairs still waiting for their other stream) per session: each dial enters the pod's
# network namespace in a thread, so an unbounded client would start unbounded threads.
MAX_FORWARDS = 128


class SpdyPortForward:
    def __init__(self, request: PortForwardRequest, backend: StreamBackend, log: Any) -> None:
        self._req, self._backend, self._log = request, backend, log
        self._pairs: dict[str, _Pair] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.session: SpdySession | None = None

    def on_stream(self, stream: SpdyStream) -> None:
        assert self.session is not None
        kind = stream.header("streamtype")
        request_id = stream.header("requestid")
        if not request_id:
            # Clients before Kubernetes 1.5 send no requestID; the error stream comes first, then data.
            request_id = str(stream.id if kind == "error" else stream.id - 2)
        pair = self._pairs.get(request_id)
        if kind not in ("data", "error") or (pair is not None and getattr(pair, kind) is not None):
            self._log.warning("rejecting spdy stream", stream_type=kind, request_id=request_id)
            stream.reset(sf.PROTOCOL_ERROR)
            return
        if pair is None:
            if len(self._pairs) + len(self._tasks) >= MAX_FORWARDS:
                self._log.warning("too many port-forward streams in one session; refusing", request_id=request_id,
                                  limit=MAX_FORWARDS)
                stream.reset(sf.REFUSED_STREAM)
                return
            pair = self._pairs[request_id] = _Pair(request_id)
        self.session.reply(stream)
        setattr(pair, kind, stream)
        if kind == "error":
            stream.discard()
        if pair.data is not None and pair.error is not None:
            del self._pairs[request_id]
            if pair.timer is not None:
                pair.timer.cancel()
            task = asyncio.ensure_future(self._forward(pair.data, pair.error))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif pair.timer is None:
            pair.timer = asyncio.get_running_loop().call_later(STREAM_CREATION_TIMEOUT, self._expire, pair)

    def _expire(self, pair: _Pair) -> None:
        if self._pairs.pop(pair.request_id, None) is not None:
            self._log.warning("port-forward stream pair incomplete; resetting", request_id=pair.request_id)
            for stream in (pair.data, pair.error):
                if stream is not None:
                    stream.reset(sf.CANCEL)

    async def run(self) -> None:
        """Serve pairs until the client closes the connection; then stop every forward."""
        assert self.session is not None
        try:
            await self.session.closed.wait()
        finally:
            for pair in self._pairs.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            for t in self._tasks:
                t.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=10)

    async def _forward(self, data: SpdyStream, error: SpdyStream) -> None:
        raw = data.header("port")
        pod = self._req.pod_id
        try:
            port = portforward.check_port(raw, self._req.ports)
            reader, writer = await portforward.dial(self._backend, pod, port)
        except Exception as e:
            msg = f"error forwarding port {raw} to pod {pod}: {e}"
            self._log.warning("port-forward failed", port=raw, error=str(e))
            with contextlib.suppress(ConnectionError):
                await error.write(msg.encode())
            data.close()
            error.close()
            return
        try:
            await portforward.pump(reader, writer, data.read, data.write, lambda: data.was_reset)
        except Exception as e:
            if not isinstance(e, ConnectionError):
                self._log.warning("port-forward copy failed", port=port, error=str(e))
            with contextlib.suppress(ConnectionError):
                await error.write(f"error forwarding port {port} to pod {pod}: {e}".encode())
        finally:
            data.close()
            error.close()
