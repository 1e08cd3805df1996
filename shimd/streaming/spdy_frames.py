"""SPDY/3.1 wire format: frame headers, control frame payloads and the compressed header block.

Written from the SPDY/3.1 draft (chromium.org spdy-protocol-draft3-1); kubectl, crictl and kubelet
speak it through moby/spdystream. Only the parts a streaming server needs are here: no push, no
CREDENTIAL frames.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7

SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 2**31 - 1
MAX_FRAME_PAYLOAD = 2**24 - 1

# Header-block compression dictionary (SPDY/3 spec section 2.6.10.1): length-prefixed header
# names and common values, then raw status lines, dates and media types. Built from its parts so
# it can be read; its identity is checked by the adler32 that zlib verifies on every peer.
_DICT_WORDS = [
    *(
        "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date "
    "etag expect expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
    "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status"
    ).split(),
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
]
_DICT_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,"
    "deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = (
    b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICT_WORDS) + _DICT_TAIL.encode()
)
assert len(HEADER_DICTIONARY) == 1423, len(HEADER_DICTIONARY)

Headers = dict[str, list[str]]


class SpdyProtocolError(Exception):
    """The peer sent something no SPDY/3.1 endpoint may send; the session must end."""


@dataclass
class Frame:
    """One decoded frame. `kind` is 0 for DATA, else the control frame type."""

    kind: int
    flags: int
    stream_id: int = 0
    data: bytes = b""
    headers: Headers = field(default_factory=dict)
    associated_id: int = 0
    status: int = 0
    delta: int = 0
    ping_id: int = 0
    settings: dict[int, int] = field(default_factory=dict)


class HeaderCodec:
    """One zlib stream per direction for the whole session, flushed (Z_SYNC_FLUSH) per block."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                         zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY)

    def encode(self, headers: Headers) -> bytes:
        parts = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            n, v = name.lower().encode(), b"\x00".join(x.encode() for x in values)
            parts += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
        raw = b"".join(parts)
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, block: bytes) -> Headers:
        try:
            raw = self._inflate.decompress(block, 1 << 20)
        except zlib.error as e:
            raise SpdyProtocolError(f"header block: {e}") from e
        if self._inflate.unconsumed_tail:
            raise SpdyProtocolError("header block larger than 1 MiB")
        try:
            (count,), pos = struct.unpack_from(">I", raw, 0), 4
            out: Headers = {}
            for _ in range(count):
                (nlen,) = struct.unpack_from(">I", raw, pos)
                name = raw[pos + 4:pos + 4 + nlen].decode()
                pos += 4 + nlen
                (vlen,) = struct.unpack_from(">I", raw, pos)
                value = raw[pos + 4:pos + 4 + vlen].decode()
                pos += 4 + vlen
                if pos > len(raw):
                    raise SpdyProtocolError("header block truncated")
                out.setdefault(name.lower(), []).extend(value.split("\x00"))
            return out
        except (struct.error, UnicodeDecodeError) as e:
            raise SpdyProtocolError(f"header block malformed: {e}") from e


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def syn_reply(codec: HeaderCodec, stream_id: int, headers: Headers, fin: bool = False) -> bytes:
    return _control(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + codec.encode(headers))


def rst_stream(stream_id: int, status: int) -> bytes:
    return _control(RST_STREAM, 0, struct.pack(">II", stream_id, status))


def settings(values: dict[int, int]) -> bytes:
    body = struct.pack(">I", len(values)) + b"".join(struct.pack(">II", k & 0xFFFFFF, v) for k, v in values.items())
    return _control(SETTINGS, 0, body)


def ping(ping_id: int) -> bytes:
    return _control(PING, 0, struct.pack(">I", ping_id))


def goaway(last_good: int, status: int = 0) -> bytes:
    return _control(GOAWAY, 0, struct.pack(">II", last_good, status))


def window_update(stream_id: int, delta: int) -> bytes:
    return _control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))


def split_header(head: bytes) -> tuple[bool, int, int, int]:
    """(is_control, type-or-stream-id, flags, length) from the 8 fixed bytes of a frame."""
    first, second = struct.unpack(">II", head)
    flags, length = second >> 24, second & 0xFFFFFF
    if first & 0x80000000:
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        return True, kind, flags, length
    return False, first & 0x7FFFFFFF, flags, length


def parse_control(codec: HeaderCodec, kind: int, flags: int, body: bytes) -> Frame:
    """Decode a control frame body. Unknown types come back with only kind/flags (to be ignored)."""
    f = Frame(kind=kind, flags=flags)
    try:
        if kind == SYN_STREAM:
            sid, assoc = struct.unpack_from(">II", body)
            f.stream_id, f.associated_id = sid & 0x7FFFFFFF, assoc & 0x7FFFFFFF
            f.headers = codec.decode(body[10:])
        elif kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from(">I", body)
            f.stream_id = sid & 0x7FFFFFFF
            f.headers = codec.decode(body[4:])
        elif kind == RST_STREAM:
            sid, f.status = struct.unpack_from(">II", body)
            f.stream_id = sid & 0x7FFFFFFF
        elif kind == SETTINGS:
            (count,) = struct.unpack_from(">I", body)
            for i in range(count):
                key, value = struct.unpack_from(">II", body, 4 + 8 * i)
                f.settings[key & 0xFFFFFF] = value
        elif kind == PING:
            (f.ping_id,) = struct.unpack_from(">I", body)
        elif kind == GOAWAY:
            (sid,) = struct.unpack_from(">I", body)
            f.stream_id = sid & 0x7FFFFFFF
            f.status = struct.unpack_from(">I", body, 4)[0] if len(body) >= 8 else 0
        elif kind == WINDOW_UPDATE:
            sid, delta = struct.unpack_from(">II", body)
            f.stream_id, f.delta = sid & 0x7FFFFFFF, delta & 0x7FFFFFFF
    except struct.error as e:
        raise SpdyProtocolError(f"control frame type {kind} too short ({len(body)} bytes)") from e
    return f
