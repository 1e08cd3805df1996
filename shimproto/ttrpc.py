"""ttrpc framing and messages, shared by shimd's client and the shim's server (ttrpc_server.py).

Wire facts (containerd/ttrpc): every message is a 10-byte header — payload length (uint32 BE),
stream id (uint32 BE), message type (1 request, 2 response), flags — then the payload, at most
4 MiB. A request payload is a ttrpc Request {service, method, payload, timeout_nano, metadata}; the
answer is a Response {status (google.rpc.Status), payload} on the same stream id. Clients use odd
stream ids. Status codes are gRPC's.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from shimproto import messages as m
from shimproto.proto import Schema, decode, encode

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing itself is not imported at run time: each shim would carry it
    from typing import Protocol

    class FrameReader(Protocol):
        async def readexactly(self, n: int, /) -> bytes: ...

HEADER = struct.Struct(">IIBB")
HEADER_LEN = HEADER.size  # 10
MAX_MESSAGE = 4 << 20
TYPE_REQUEST, TYPE_RESPONSE = 1, 2

# gRPC status codes used by ttrpc.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND, ALREADY_EXISTS = 0, 1, 2, 3, 4, 5, 6
PERMISSION_DENIED, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE = 7, 8, 9, 10, 11
UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED = 12, 13, 14, 15, 16


class TtrpcError(Exception):
    """A non-OK ttrpc status: raised by handlers, and by clients on a failed call."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameTooLarge(Exception):
    def __init__(self, stream_id: int, length: int) -> None:
        super().__init__(f"message length {length} exceeds the maximum of {MAX_MESSAGE}")
        self.stream_id = stream_id
        self.length = length


def pack_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise FrameTooLarge(stream_id, len(payload))
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


async def read_frame(reader: FrameReader) -> tuple[int, int, int, bytes]:
    """One (stream_id, type, flags, payload); raises FrameTooLarge before reading an oversized body."""
    length, stream_id, mtype, flags = HEADER.unpack(await reader.readexactly(HEADER_LEN))
    if length > MAX_MESSAGE:
        raise FrameTooLarge(stream_id, length)
    payload = await reader.readexactly(length) if length else b""
    return stream_id, mtype, flags, payload


def encode_request(service: str, method: str, payload: bytes, timeout_ns: int = 0) -> bytes:
    return encode(m.TTRPC_REQUEST, {"service": service, "method": method, "payload": payload,
                                    "timeout_nano": timeout_ns})


def encode_response(payload: bytes = b"", code: int = OK, message: str = "") -> bytes:
    status = {"code": code, "message": message} if code != OK else None
    return encode(m.TTRPC_RESPONSE, {"status": status, "payload": payload})


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    resp = decode(m.TTRPC_RESPONSE, data)
    status = resp["status"] or {"code": OK, "message": ""}
    return status["code"], status["message"], resp["payload"]


Handler = Callable[[dict], Awaitable[dict]]  # request fields -> response fields


class Service:
    """Named ttrpc service: method name -> (request schema, response schema, handler)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.methods: dict[str, tuple[Schema, Schema, Handler]] = {}

    def register(self, method: str, req: Schema, resp: Schema, handler: Handler) -> None:
        self.methods[method] = (req, resp, handler)
