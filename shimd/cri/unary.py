"""A unary gRPC call answered without grpclib's per-call machinery, on the same wire as grpclib answers it.

For a small call grpclib's request handler, Stream, metadata, event dispatch, DeadlineWrapper and
buffers took about 42% of the daemon's CPU (cProfile, ListPodSandbox at 20 pods). A unary request
needs none of it once its headers and whole body are in: the body is decoded, the same handler
dispatch.py gives grpclib is run on a small stream object, and headers, message and trailers go out
together. Only the usual case is taken here (POST, gRPC proto content type, te: trailers, a known unary
method, a valid grpc-timeout, one uncompressed message within the size limit that arrived in one
piece); everything else, and every streaming method, is handed to grpclib as it arrived, so grpclib
stays the reference for what the client sees (tests/unit/test_unary_fast_path.py compares the two).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import types
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any

from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import ProtocolError
from grpclib.metadata import Deadline, decode_metadata, encode_grpc_message
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError

from shimd import log as shimd_log
from shimd.cri import h2_server

_CONTENT_TYPES = frozenset({"application/grpc", "application/grpc+proto"})
_RESPONSE_HEADERS = ((":status", "200"), ("content-type", "application/grpc+proto"))
# The W3C trace context a client sends with a call (kubelet with its tracing on): kept for shimd.tracing.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_OK_TRAILERS = (("grpc-status", "0"),)
# A body this long is left to grpclib: it hands the window back as it reads, this path only at the end.
MAX_BUFFERED = 64 * 1024
# A client that opens no window for this long while a response waits on it loses the stream.
WINDOW_WAIT = 120.0

log = shimd_log.get("cri.unary")


class UnaryStream:
    """What a generated unary handler (and dispatch's wrapper around it) uses of grpclib's Stream."""

    __slots__ = ("_codec", "_recv_type", "_send_type", "recv_message", "reply", "request_body", "trace_headers")

    def __init__(self, body: bytes, recv_type: type, send_type: type, codec: ProtoCodec,
                 trace_headers: dict[str, str] | None = None) -> None:
        self.request_body = body  # the message's bytes, its length prefix already checked
        self.trace_headers = trace_headers  # TRACE_HEADERS the client sent, None when it sent none
        self._recv_type = recv_type
        self._send_type = send_type
        self._codec = codec
        self.reply: bytes | None = None
        self.recv_message: Callable[[], Coroutine[Any, Any, Any]] | None = None  # set by dispatch's wrapper

    async def send_message(self, message: Any) -> None:
        if self.reply is not None:
            raise ProtocolError("Message was already sent")
        body = self._codec.encode(message, self._send_type)  # its TypeError is the handler's, as in grpclib
        self.reply = b"\x00" + len(body).to_bytes(4, "big") + body


class _Call:
    __slots__ = ("body", "deadline", "events", "flow", "headers_sent", "method", "path", "size", "task", "trace",
                 "window")

    def __init__(self, path: str, method: Handler, deadline: Deadline | None, request: RequestReceived,
                 trace: dict[str, str] | None = None) -> None:
        self.path = path
        self.trace = trace
        self.method = method
        self.deadline = deadline
        self.events: list[Event] = [request]  # what grpclib gets if the call turns out unusual
        self.body: list[bytes] = []
        self.size = 0
        self.flow = 0  # what the body cost of the connection's window, padding included
        self.task: asyncio.Task[None] | None = None
        self.window: asyncio.Event | None = None
        self.headers_sent = False


@dataclass(frozen=True)
class Wire:
    """The connection as this path uses it; grpc_server builds it from grpclib's protocol (its hooks)."""

    h2: h2_server.ServerConnection
    send: Callable[[], None]  # what h2 has to send, to the transport
    push: Callable[[], None]  # the transport's pending writes, to the socket now
    closing: Callable[[], bool]
    write_ready: asyncio.Event  # cleared while the transport's buffer is full
    to_grpclib: Callable[[Event], None]  # grpclib's processing of one event


class UnaryCalls:
    """The fast-path calls of one connection; every task is owned here and by the server's task set."""

    def __init__(self, methods: dict[str, Handler], wire: Wire, tasks: set[asyncio.Task[None]],
                 max_message: int) -> None:
        self._methods = methods
        self._wire = wire
        self._h2 = wire.h2
        self._tasks = tasks
        self._max_message = max_message
        self._calls: dict[int, _Call] = {}
        self._codec = ProtoCodec()

    # --- events --------------------------------------------------------------------------------
    def take(self, event: Event) -> bool:
        """Whether the event belongs to a fast call (else grpclib processes it)."""
        kind = type(event)
        if kind is RequestReceived:
            return self._request(event)  # type: ignore[arg-type]
        stream_id = getattr(event, "stream_id", None)
        call = self._calls.get(stream_id) if stream_id else None
        if call is None:
            if kind is WindowUpdated or kind is RemoteSettingsChanged:
                self._wake_all()
            elif kind is ConnectionTerminated:
                self.close()
            return False
        if kind is DataReceived:
            if call.task is None:
                call.events.append(event)
                call.body.append(event.data)  # type: ignore[attr-defined]
                call.size += len(event.data)  # type: ignore[attr-defined]
                call.flow += event.flow_controlled_length  # type: ignore[attr-defined]
                if call.size > MAX_BUFFERED:
                    self._hand_over(stream_id, call)  # type: ignore[arg-type]
            return True
        if kind is StreamEnded:
            if call.task is None:
                call.events.append(event)
                self._start(stream_id, call)  # type: ignore[arg-type]
            return True
        if kind is StreamReset:
            del self._calls[stream_id]  # type: ignore[arg-type]
            if call.task is not None:
                call.task.cancel()  # as grpclib cancels its handler's task
            return True
        if kind is WindowUpdated and call.window is not None:
            call.window.set()
        return True

    def _request(self, event: RequestReceived) -> bool:
        headers = event.headers
        path = method = content_type = te = None
        timeout = binary = False
        trace: dict[str, str] | None = None
        for name, value in headers:  # type: ignore[union-attr]
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                content_type = value
            elif name == "te":
                te = value
            elif name == "grpc-timeout":
                timeout = True
            elif name.endswith("-bin"):  # type: ignore[union-attr]
                binary = True
            elif name in TRACE_HEADERS:
                if trace is None:
                    trace = {}
                trace[name] = value  # type: ignore[index]
        handler = self._methods.get(path) if path is not None else None  # type: ignore[arg-type]
        if handler is None or method != "POST" or content_type not in _CONTENT_TYPES or te != "trailers":
            return False
        deadline = None
        if timeout:
            try:
                deadline = Deadline.from_headers(headers)  # type: ignore[arg-type]
            except ValueError:
                return False
        if binary:
            try:
                decode_metadata(headers)  # type: ignore[arg-type]
            except Exception:  # grpclib's handler fails on it its own way
                return False
        self._calls[event.stream_id] = _Call(path, handler, deadline, event, trace)  # type: ignore[arg-type]
        return True

    def _hand_over(self, stream_id: int, call: _Call) -> None:
        """The call is not the usual case after all: grpclib gets its events as they came."""
        del self._calls[stream_id]
        for event in call.events:
            self._wire.to_grpclib(event)

    def _start(self, stream_id: int, call: _Call) -> None:
        data = call.body[0] if len(call.body) == 1 else b"".join(call.body)
        call.body = []
        if len(data) < 5 or data[0] or int.from_bytes(data[1:5], "big") != len(data) - 5 \
                or len(data) - 5 > self._max_message:
            self._hand_over(stream_id, call)
            return
        call.events = []
        # The client sends nothing more on the stream: only the connection's window is handed back.
        self._h2.acknowledge_received_data(call.flow, stream_id)
        loop = asyncio.get_running_loop()
        if not getattr(call.method.func, "starts_in_place", False):
            task = loop.create_task(self._serve(stream_id, call, data[5:], timed=True))
        else:
            # Run here up to its first wait: most such calls answer from memory and never wait, and then
            # neither a task nor another turn of the loop is spent on them. Their own context, as a task's.
            coro = self._serve(stream_id, call, data[5:], timed=False)
            context = contextvars.copy_context()
            try:
                first = context.run(coro.send, None)
            except StopIteration:
                return
            task = loop.create_task(self._resume(stream_id, call, coro, first), context=context)
            task.add_done_callback(lambda _: _cancel_unstarted(coro))
        call.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake_all(self) -> None:
        for call in self._calls.values():
            if call.window is not None:
                call.window.set()

    def close(self) -> None:
        """The connection is gone: its calls' handlers are cancelled, as grpclib cancels its own."""
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.task is not None:
                call.task.cancel()

    # --- a call --------------------------------------------------------------------------------
    async def _serve(self, stream_id: int, call: _Call, body: bytes, timed: bool) -> None:
        """The call, from decoding to trailers; timed: the deadline is kept here (else by _resume)."""
        try:
            status, message, reply = await self._run(call, body, timed)
            await self._respond(stream_id, call, status, message, reply)
        except StreamClosedError:
            pass  # reset by the client while we answered: nobody is left to answer
        except TimeoutError:
            log.warning("client opened no window for the response", path=call.path, seconds=WINDOW_WAIT)
            if stream_id in self._h2.streams:
                self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self._wire.send()
        except Exception:
            log.exception("unary response failed", path=call.path)
        finally:
            if self._calls.get(stream_id) is call:
                del self._calls[stream_id]

    async def _resume(self, stream_id: int, call: _Call, coro: Coroutine[Any, Any, None], first: Any) -> None:
        """The rest of a call started in place, now in a task, which keeps the deadline."""
        try:
            if call.deadline is None:
                await _continue(coro, first)
            else:
                async with asyncio.timeout(call.deadline.time_remaining()):
                    await _continue(coro, first)
        except TimeoutError:
            log.info("deadline exceeded", path=call.path)
            with contextlib.suppress(StreamClosedError):
                await self._respond(stream_id, call, Status.DEADLINE_EXCEEDED, None, None)

    async def _run(self, call: _Call, body: bytes, timed: bool) -> tuple[Status, str | None, bytes | None]:
        method = call.method
        stream = UnaryStream(body, method.request_type, method.reply_type, self._codec, call.trace)
        func: Callable[[UnaryStream], Coroutine[Any, Any, None]] = method.func
        try:
            if call.deadline is None or not timed:
                await func(stream)
            else:
                async with asyncio.timeout(call.deadline.time_remaining()):
                    await func(stream)
        except GRPCError as e:
            return e.status, e.message, stream.reply
        except TimeoutError:  # only the deadline's: dispatch's wrapper turns the handler's own into INTERNAL
            log.info("deadline exceeded", path=call.path)
            return Status.DEADLINE_EXCEEDED, None, stream.reply
        except Exception:
            log.exception("application error", path=call.path)
            return Status.UNKNOWN, "Internal Server Error", stream.reply
        if stream.reply is None:
            log.error("unary response with OK status requires a single message to be sent", path=call.path)
            return Status.UNKNOWN, "Internal Server Error", None
        return Status.OK, None, stream.reply

    async def _respond(self, stream_id: int, call: _Call, status: Status, message: str | None,
                       reply: bytes | None) -> None:
        conn = self._h2
        if stream_id not in conn.streams or self._wire.closing():
            return
        if status is Status.OK:
            trailers: tuple[tuple[str, str], ...] = _OK_TRAILERS
        else:
            trailers = (("grpc-status", str(status.value)),)
            if message is not None:
                trailers += (("grpc-message", encode_grpc_message(message)),)
        if call.headers_sent:  # a deadline that passed while the message was going out
            conn.send_headers(stream_id, trailers, end_stream=True)
            self._flush()
            return
        if reply is None:
            conn.send_headers(stream_id, _RESPONSE_HEADERS + trailers, end_stream=True)
            self._flush()
            return
        conn.send_headers(stream_id, _RESPONSE_HEADERS)
        call.headers_sent = True
        pos, end = 0, len(reply)
        while pos < end:
            window = conn.local_flow_control_window(stream_id)
            if window <= 0 or not self._wire.write_ready.is_set():
                self._wire.send()
                await self._wait_window(call)
                continue
            size = min(window, conn.max_outbound_frame_size, end - pos)
            conn.send_data(stream_id, reply[pos:pos + size] if size != end else reply)
            pos += size
        conn.send_headers(stream_id, trailers, end_stream=True)
        self._flush()

    def _flush(self) -> None:
        """The answer goes to the socket now, not at the end of the loop's turn: it is complete."""
        self._wire.send()
        self._wire.push()

    async def _wait_window(self, call: _Call) -> None:
        if not self._wire.write_ready.is_set():
            await _wait_event(self._wire.write_ready, WINDOW_WAIT)
            return
        if call.window is None:
            call.window = asyncio.Event()
        call.window.clear()
        await _wait_event(call.window, WINDOW_WAIT)


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    """asyncio.wait, not wait_for or timeout(): a call started in place may wait here before any task
    runs it, and from Python 3.12 on those two need a current task."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    if not done:
        raise TimeoutError


def _cancel_unstarted(coro: Coroutine[Any, Any, None]) -> None:
    """A task cancelled before its first step never ran _resume: the call it was to go on with is told."""
    if coro.cr_frame is None:
        return  # finished, the usual case
    try:
        coro.throw(asyncio.CancelledError())
    except BaseException:  # CancelledError (or the handler's own error) ends it
        return
    coro.close()  # it waits again: no task is left to wait in


@types.coroutine
def _continue(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """Goes on with a coroutine whose first step ran outside any task, waiting on `waiting`: what it
    waits on is handed to the task running this, and what the task sends or throws is passed on."""
    while True:
        try:
            value = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # CancelledError above all: the handler must see it
            try:
                waiting = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(value)
            except StopIteration:
                return


def unary_methods(mapping: dict[str, Handler]) -> dict[str, Handler]:
    """The methods this path serves: every unary one whose handler is dispatch's (it decodes request_body)."""
    return {path: h for path, h in mapping.items()
            if h.cardinality is Cardinality.UNARY_UNARY and getattr(h.func, "reads_request_body", False)}
