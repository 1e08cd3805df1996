"""An asyncio transport stand-in for the CRI server's unit tests: keeps what is written, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RecordingTransport:
    def __init__(self, extra_info: Callable[[str], Any] = lambda name: None) -> None:
        """extra_info: answers get_extra_info (default: no peer address, socket or ssl object)."""
        self.writes: list[bytes] = []
        self.closed = False
        self._extra_info = extra_info

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return self._extra_info(name)

    @staticmethod
    def writes_of(proto: Any) -> list[bytes]:
        """What the server protocol wrote, its corked writes flushed first (grpc_server.CorkedTransport)."""
        corked = proto.connection._transport
        corked.flush()
        return corked._transport.writes


def fast_path_calls(monkeypatch: Any) -> list[str]:
    """The paths of the calls the unary fast path (shimd.cri.unary) serves from now on, in order."""
    from shimd.cri import unary

    served: list[str] = []
    start = unary.UnaryCalls._start

    def counting(self: unary.UnaryCalls, stream_id: int, call: Any) -> None:
        served.append(call.path)
        start(self, stream_id, call)

    monkeypatch.setattr(unary.UnaryCalls, "_start", counting)
    return served
