"""Turns a betterproto service into grpclib handlers with shimd's error and logging policy.

Every RPC the proto defines is served. Domain errors become their gRPC status with the message
intact; an RPC not built yet answers UNIMPLEMENTED naming itself; anything unexpected is logged
with its traceback and answered INTERNAL, so no request can take the daemon down.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from typing import Any

import betterproto
import grpclib
import grpclib.const
import grpclib.exceptions
import grpclib.server
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec

from shimd import errors, log, phases
from shimd.cri import grpc_server, wire
from shimd.cri.unary import TRACE_HEADERS

_STATUS: dict[type[errors.ShimdError], Status] = {
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    errors.ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    errors.Unavailable: Status.UNAVAILABLE,
}

_EXHAUSTED_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE)

Observer = Callable[[str, str, float], None]
_observers: list[Observer] = []


def add_observer(fn: Observer) -> None:
    """Called with (method, status name, seconds) after every RPC; used by metrics."""
    _observers.append(fn)


# (gRPC path without its leading slash, status name, start and end in ns since the epoch, the client's
# trace context headers or None, the call's phases when it is timed): shimd.tracing.Tracing.call_ended.
CallTracer = Callable[[str, str, int, int, "dict[str, str] | None", "phases.Phases | None"], None]
_tracer: CallTracer | None = None


def set_tracer(fn: CallTracer | None) -> None:
    """Every RPC that ends from now on is handed to fn (None: to nothing)."""
    global _tracer
    _tracer = fn


def _trace(tracer: CallTracer, logger: Any, method: str, outcome: str, started_ns: int, ended_ns: int,
           headers: dict[str, str] | None, timed: phases.Phases | None) -> None:
    try:
        tracer(method, outcome, started_ns, ended_ns, headers, timed)
    except Exception as e:  # a trace is never worth more than the daemon's log line about it
        logger.warning("tracing the call failed", error=repr(e))


def _trace_headers(stream: Any) -> dict[str, str] | None:
    """The trace context the client sent: kept by the unary fast path, else in grpclib's request metadata."""
    if hasattr(stream, "trace_headers"):
        return stream.trace_headers  # type: ignore[no-any-return]
    metadata = getattr(stream, "metadata", None) or {}
    found = {name: metadata[name] for name in TRACE_HEADERS if isinstance(metadata.get(name), str)}
    return found or None


def status_for(exc: BaseException) -> tuple[Status, str]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls], str(exc)
    return Status.INTERNAL, f"internal error: {exc}"


# Calls that read memory until their first wait (if any) and use nothing there that needs a current task
# (asyncio.timeout, TaskGroup): unary.py runs them in place up to that wait instead of starting a task.
_IN_PLACE = frozenset({"Version", "Status", "ListPodSandbox", "ListContainers", "PodSandboxStatus",
                       "ContainerStatus", "ListImages", "ImageStatus"})


# Request fields no handler reads, by method, left out before decoding (wire.without_fields).
_UNREAD_FIELDS = {"CreateContainer": frozenset({3})}  # sandbox_config: shimd has the pod's own record


def _wrap(path: str, func: Callable[[grpclib.server.Stream], Awaitable[None]],
          max_message: int) -> Callable[..., Awaitable[None]]:
    full_method = path.lstrip("/")
    method = full_method.rsplit("/", 1)[-1]
    logger = log.get("cri", method=method)

    async def handler(stream: grpclib.server.Stream) -> None:
        start = time.monotonic()
        started_ns = time.time_ns() if _tracer is not None else 0
        outcome = "OK"
        timing = phases.begin(method)
        _checked_decoding(stream, method, max_message)
        try:
            await func(stream)
        except grpclib.GRPCError as e:
            outcome = e.status.name
            if e.status is Status.UNIMPLEMENTED and not e.message:
                raise grpclib.GRPCError(Status.UNIMPLEMENTED, f"{method} is not implemented by shimd") from None
            raise
        except errors.ShimdError as e:
            status, message = status_for(e)
            outcome = status.name
            if status is Status.INTERNAL:
                logger.error("rpc failed", error=message, exc_info=True)
            else:
                logger.info("rpc refused", status=outcome, error=message)
            raise grpclib.GRPCError(status, message) from None
        except OSError as e:
            if e.errno in _EXHAUSTED_ERRNOS:
                # A full disk (or quota) is the node's condition, not a runtime bug: kubelet backs off on it.
                outcome = Status.RESOURCE_EXHAUSTED.name
                logger.warning("rpc refused", status=outcome, error=str(e))
                raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, f"{method}: {e}") from None
            outcome = "INTERNAL"
            logger.error("rpc crashed", error=repr(e), exc_info=True)
            raise grpclib.GRPCError(Status.INTERNAL, f"{method}: internal error: {e}") from None
        except (grpclib.exceptions.StreamTerminatedError, grpclib.exceptions.ProtocolError):
            outcome = "CANCELLED"  # the client went away; nobody is left to answer
            raise
        except Exception as e:  # the promise above: nothing a request does takes shimd down
            outcome = "INTERNAL"
            logger.error("rpc crashed", error=repr(e), exc_info=True)
            raise grpclib.GRPCError(Status.INTERNAL, f"{method}: internal error: {e}") from None
        finally:
            elapsed = time.monotonic() - start
            timed = phases.end(timing, outcome)
            logger.debug("rpc", status=outcome, seconds=round(elapsed, 6))
            for obs in _observers:
                obs(method, outcome, elapsed)
            if _tracer is not None and started_ns:
                # On the loop's next turn: the unary fast path sends the answer after this returns, and the
                # spans' cost must not be the caller's wait.
                asyncio.get_running_loop().call_soon(_trace, _tracer, logger, full_method, outcome, started_ns,
                                                     time.time_ns(), _trace_headers(stream), timed)

    handler.reads_request_body = True  # type: ignore[attr-defined]  # unary.py may serve it: see _checked_decoding
    handler.starts_in_place = method in _IN_PLACE  # type: ignore[attr-defined]
    return handler


def _checked_decoding(stream: grpclib.server.Stream, method: str, max_message: int) -> None:
    """A request body that is not a valid message is the caller's error (INVALID_ARGUMENT), not ours; one
    longer than max_message is RESOURCE_EXHAUSTED before a byte of it is buffered."""

    body = getattr(stream, "request_body", None)
    unread = _UNREAD_FIELDS.get(method)

    async def recv() -> Any:
        if body is not None:  # the unary fast path (unary.py) read the request whole and checked its framing
            return _decode(stream, wire.without_fields(body, unread) if unread else body)
        # grpclib's Stream.recv_message, with the length prefix checked before the body is read: grpclib
        # itself would collect a declared 4 GiB body in memory, handing the window back as it goes.
        h2_stream = stream._stream
        meta = await h2_stream.recv_data(5)
        if not meta:
            return None
        if meta[0]:
            raise grpclib.GRPCError(Status.UNIMPLEMENTED, f"{method}: compressed request messages are not supported")
        size = int.from_bytes(meta[1:5], "big")
        if size > max_message:
            raise grpclib.GRPCError(Status.RESOURCE_EXHAUSTED, f"{method}: request message of {size} bytes is "
                                    f"larger than the maximum of {max_message} (daemon.max_recv_message_size)")
        data = await h2_stream.recv_data(size) if size else b""
        message = _decode(stream, wire.without_fields(data, unread) if unread else data)
        (message,) = await stream._dispatch.recv_message(message)
        stream._messages_received += 1
        h2_stream.connection.messages_received += 1
        h2_stream.connection.last_message_received = time.monotonic()
        return message

    async def recv_message() -> Any:
        try:
            message = await recv()
        except (grpclib.GRPCError, grpclib.exceptions.StreamTerminatedError, grpclib.exceptions.ProtocolError):
            raise
        except Exception as e:  # betterproto raises EOFError, ValueError, IndexError...
            raise errors.InvalidArgument(f"{method}: malformed request message: {e}") from None
        if message is not None:
            wrong = _wrong_type(message, "request")
            if wrong:
                raise errors.InvalidArgument(f"{method}: malformed request message: {wrong} has the wrong wire type")
        return message

    grpc_server.replace_recv_message(stream, recv_message)


def _decode(stream: Any, data: bytes) -> Any:
    if data:
        return stream._codec.decode(data, stream._recv_type)
    if type(stream._codec) is ProtoCodec:
        return wire.empty(stream._recv_type)  # the library's result, without its set-up cost
    return stream._codec.decode(b"", stream._recv_type)


_SCALARS: dict[str, type | tuple[type, ...]] = {"string": str, "bytes": bytes, "bool": bool, "float": (float, int),
                                                "double": (float, int)}


def _wrong_type(msg: betterproto.Message, path: str) -> str:
    """The first field whose decoded value has the wrong Python type, or "".

    betterproto trusts the wire type it reads, so a varint sent where a message belongs decodes to
    an int in a message field, and the handler would fail far from the cause.
    """
    meta = msg._betterproto
    for name, fm in meta.meta_by_field_name.items():
        if object.__getattribute__(msg, name) is betterproto.PLACEHOLDER:
            continue  # not on the wire: left at its default, so nothing decoded to check (and none built)
        value = getattr(msg, name)
        where = f"{path}.{name}"
        if value is None and (fm.optional or fm.wraps or fm.group):
            continue
        if fm.proto_type == "map":
            if not isinstance(value, dict):
                return where
            kt, vt = fm.map_types or ("string", "string")
            for k, v in value.items():
                if not _scalar_ok(kt, k):
                    return where
                if vt == "message":
                    if not isinstance(v, betterproto.Message):
                        return where
                    bad = _wrong_type(v, f"{where}[{k!r}]")
                    if bad:
                        return bad
                elif not _scalar_ok(vt, v):
                    return where
            continue
        items = value if meta.default_gen[name] is list else [value]
        if meta.default_gen[name] is list and not isinstance(value, list):
            return where
        for item in items:
            if fm.proto_type == "message":
                if fm.wraps:
                    continue
                if not isinstance(item, betterproto.Message):
                    return where
                bad = _wrong_type(item, where)
                if bad:
                    return bad
            elif not _scalar_ok(fm.proto_type, item):
                return where
    return ""


def _scalar_ok(proto_type: str, value: Any) -> bool:
    return isinstance(value, _SCALARS.get(proto_type, int))


DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


def mapping(service: Any, max_message: int = DEFAULT_MAX_MESSAGE) -> dict[str, grpclib.const.Handler]:
    """The service's own mapping, each handler wrapped."""
    out: dict[str, grpclib.const.Handler] = {}
    for path, h in service.__mapping__().items():
        out[path] = grpclib.const.Handler(_wrap(path, h.func, max_message), h.cardinality,
                                          h.request_type, h.reply_type)
    return out


class Wrapped:
    """What grpclib.server.Server takes: an object with __mapping__."""

    def __init__(self, service: Any, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message  # grpc_server's unary path leaves longer requests to grpclib
        self._mapping = mapping(service, max_message)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._mapping
