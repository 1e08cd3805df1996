"""Turns a betterproto service into grpclib handlers with shimd's error and logging policy.

Every RPC the proto defines is served. Domain errors become their gRPC status with the message
intact; an RPC not built yet answers UNIMPLEMENTED naming itself; anything unexpected is logged
with its traceback and answered INTERNAL, so no request can take the daemon down.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpclib
import grpclib.const
import grpclib.exceptions
import grpclib.server
from grpclib.const import Status

from shimd import errors, log

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


def status_for(exc: BaseException) -> tuple[Status, str]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls], str(exc)
    return Status.INTERNAL, f"internal error: {exc}"


def _wrap(method: str, func: Callable[[grpclib.server.Stream], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    logger = log.get("cri", method=method)

    async def handler(stream: grpclib.server.Stream) -> None:
        start = time.monotonic()
        outcome = "OK"
        _checked_decoding(stream, method)
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
            logger.debug("rpc", status=outcome, seconds=round(elapsed, 6))
            for obs in _observers:
                obs(method, outcome, elapsed)

    return handler


def _checked_decoding(stream: grpclib.server.Stream, method: str) -> None:
    """A request body that is not a valid message is the caller's error (INVALID_ARGUMENT), not ours."""
    recv = stream.recv_message

    async def recv_message() -> Any:
        try:
            return await recv()
        except (grpclib.GRPCError, grpclib.exceptions.StreamTerminatedError, grpclib.exceptions.ProtocolError):
            raise
        except Exception as e:  # betterproto raises EOFError, ValueError, IndexError...
            raise errors.InvalidArgument(f"{method}: malformed request message: {e}") from None

    stream.recv_message = recv_message  # type: ignore[method-assign]


def mapping(service: Any) -> dict[str, grpclib.const.Handler]:
    """The service's own mapping, each handler wrapped."""
    out: dict[str, grpclib.const.Handler] = {}
    for path, h in service.__mapping__().items():
        out[path] = grpclib.const.Handler(_wrap(path.rsplit("/", 1)[-1], h.func), h.cardinality,
                                          h.request_type, h.reply_type)
    return out


class Wrapped:
    """What grpclib.server.Server takes: an object with __mapping__."""

    def __init__(self, service: Any) -> None:
        self._mapping = mapping(service)

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._mapping
