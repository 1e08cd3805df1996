"""The server side of an HTTP/2 connection (RFC 9113), for grpclib in place of h2's H2Connection.

grpclib drives HTTP/2 through h2, whose per-frame state machines, frame objects and stateful header
compression cost about 0.25 ms of the 0.75 ms a small gRPC call takes in shimd (measured in a hot
loop: 0.14 ms to take in a request, 0.09 ms to send headers, message and trailers). A gRPC server
needs a small part of HTTP/2: streams the client opens, flow control, settings, pings, resets and
goaway. This class does that part with the same method names, events (h2.events) and exceptions
(h2.exceptions) that grpclib's server uses, and nothing else (no client side, no push, no
priorities).

Header blocks are decoded with the hpack library, which keeps the client's dynamic table. They
are encoded without the dynamic table (static-table names, literal values, RFC 7541 section
6.2.2), so nothing the client does to its table concerns us, and a response's header block depends
only on the headers: it is cached. A request's header block is cached too while it consists of
indexed fields only (what grpcio sends for every call after its first): such a block leaves the
client's table as it was, so it means what it meant last time until a block that changes the table
arrives (and empties the cache). hpack's decoder took about a fifth of the daemon's CPU for a small
call. Inbound flow control is enforced as h2 does: a peer sending past
the connection's or a stream's window ends the connection with FLOW_CONTROL_ERROR, so what a client
can make us buffer is bounded by the windows we advertise; consumed data is handed back
(WINDOW_UPDATE) once half of a window is used. Against rapid reset (CVE-2023-44487), a client that
resets more than MAX_RESETS streams within RESET_INTERVAL seconds gets GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import hpack
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError, StreamClosedError
from h2.settings import ChangedSetting, SettingCodes
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MIN_FRAME, MAX_FRAME = 16384, 2**24 - 1
MAX_CONCURRENT_STREAMS = 100  # what h2 advertised for shimd before
MAX_HEADER_LIST_SIZE = 65536
MAX_HEADER_BLOCK = 4 * MAX_HEADER_LIST_SIZE  # encoded, before CONTINUATIONs are joined: bounds memory
DECODED_BLOCKS = 64  # request header blocks kept decoded per connection: a client calls a handful of methods
# Rapid reset: kubelet cancels a call now and then; thousands a second is an attack on the handlers it starts.
MAX_RESETS, RESET_INTERVAL = 200, 1.0

_HEADER = struct.Struct(">IBI")  # length << 8 | type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def _window_update(stream_id: int, increment: int) -> bytes:
    return _frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def _rst_stream(stream_id: int, code: int) -> bytes:
    return _frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """hpack's integer (RFC 7541 section 5.1) with `first`, the bits above the prefix, set."""
    out = encode_integer(value, prefix_bits)
    out[0] |= first
    return bytes(out)


def _hpack_str(data: bytes) -> bytes:
    return _hpack_int(len(data), 7, 0) + data  # no Huffman coding: the H bit stays 0


_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELD.setdefault((_name, _value), _i)
    _STATIC_NAME.setdefault(_name, _i)


def indexed_only(block: bytes) -> bool:
    """Whether a header block holds indexed fields only (RFC 7541 section 6.1): it then changes no table."""
    i, n = 0, len(block)
    while i < n:
        b = block[i]
        if b <= 0x80:  # a literal, a table size update, or index 0 (an error)
            return False
        i += 1
        if b == 0xFF:  # the index goes on in the following bytes, the last one without the high bit
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return i == n


def encode_field(name: str | bytes, value: str | bytes) -> bytes:
    """One header field, never entering the dynamic table: indexed if the static table holds it whole."""
    n = name.encode() if isinstance(name, str) else name
    v = value.encode() if isinstance(value, str) else value
    index = _STATIC_FIELD.get((n, v))
    if index is not None:
        return _hpack_int(index, 7, 0x80)
    index = _STATIC_NAME.get(n)
    if index is not None:
        return _hpack_int(index, 4, 0x00) + _hpack_str(v)
    return b"\x00" + _hpack_str(n) + _hpack_str(v)


class LocalSettings:
    """The part of h2's Settings that grpclib reads."""

    def __init__(self) -> None:
        self.initial_window_size = DEFAULT_WINDOW


class _ConnectionState:
    def __init__(self) -> None:
        self.state = ConnectionState.IDLE


class ServerStream:
    __slots__ = ("local_closed", "recv_window", "remote_closed", "send_window", "stream_id", "unacked")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send on it before our next WINDOW_UPDATE
        self.unacked = 0
        self.local_closed = False
        self.remote_closed = False

    @property
    def open(self) -> bool:
        return not (self.local_closed or self.remote_closed)

    @property
    def closed(self) -> bool:
        return self.local_closed and self.remote_closed


class ServerConnection:
    """What grpclib's server calls on h2.connection.H2Connection, for the server side only."""

    def __init__(self) -> None:
        self.local_settings = LocalSettings()
        self.state_machine = _ConnectionState()
        self.streams: dict[int, ServerStream] = {}
        self._out: list[bytes] = []
        self._in = b""
        self._preface_seen = False
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        self._decoded: dict[bytes, list[Any]] = {}  # header blocks of indexed fields only, as decoded
        self._block_cache: dict[tuple[tuple[Any, Any], ...], bytes] = {}
        self._table_size_update = b""
        # Outbound: what the peer lets us send.
        self._send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = MIN_FRAME
        # Inbound: what we let the peer send, and how much of it was consumed since the last update.
        self._recv_window = DEFAULT_WINDOW
        self._recv_left = DEFAULT_WINDOW  # of it, what the peer may still send before our next WINDOW_UPDATE
        self._recv_unacked = 0
        self._resets = 0
        self._resets_since = 0.0
        self._highest_stream_id = 0
        self._continuation: tuple[int, bool, list[bytes]] | None = None

    # --- set-up, as grpclib's protocol does it -------------------------------------------------
    def initiate_connection(self) -> None:
        self._out.append(self._settings_frame({
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }))

    def update_settings(self, new_settings: dict[int, int]) -> None:
        for code, value in new_settings.items():
            if code == SettingCodes.INITIAL_WINDOW_SIZE:
                # Sent before any stream opens (grpclib does it at connection set-up), so no open stream's
                # window needs the difference: streams the peer opens start with the new size.
                self.local_settings.initial_window_size = value
        self._out.append(self._settings_frame(new_settings))

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        if not stream_id:
            self._recv_window += increment
            self._recv_left += increment
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.recv_window += increment
        self._out.append(_window_update(stream_id or 0, increment))

    @staticmethod
    def _settings_frame(settings: dict[int, int]) -> bytes:
        return _frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(code, value) for code, value in settings.items()))

    # --- output --------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def _open_stream(self, stream_id: int) -> ServerStream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(stream_id)
        return stream

    def _close_local(self, stream: ServerStream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream.stream_id]

    def send_headers(self, stream_id: int, headers: Iterable[tuple[Any, Any]], end_stream: bool = False) -> None:
        stream = self._open_stream(stream_id)
        key = tuple(headers)
        block = self._block_cache.get(key)
        if block is None:
            block = b"".join(encode_field(n, v) for n, v in key)
            if len(self._block_cache) >= 512:  # error messages vary; the usual blocks come back at once
                self._block_cache.clear()
            self._block_cache[key] = block
        if self._table_size_update:
            block, self._table_size_update = self._table_size_update + block, b""
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        if len(block) <= limit:
            self._out.append(_frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            chunks = [block[i : i + limit] for i in range(0, len(block), limit)]
            self._out.append(_frame(HEADERS, flags, stream_id, chunks[0]))
            for chunk in chunks[1:-1]:
                self._out.append(_frame(CONTINUATION, 0, stream_id, chunk))
            self._out.append(_frame(CONTINUATION, END_HEADERS, stream_id, chunks[-1]))
        if end_stream:
            self._close_local(stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._open_stream(stream_id)
        size = len(data)
        if size > self._send_window or size > stream.send_window:
            raise FlowControlError(f"cannot send {size} bytes, flow control window is "
                                   f"{min(self._send_window, stream.send_window)}")
        if size > self.max_outbound_frame_size:
            raise FrameTooLargeError(f"cannot send frame size {size}, max frame size is "
                                     f"{self.max_outbound_frame_size}")
        self._out.append(_HEADER.pack(size << 8 | DATA, END_STREAM if end_stream else 0, stream_id))
        if size:
            self._out.append(data)
        self._send_window -= size
        stream.send_window -= size
        if end_stream:
            self._close_local(stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise StreamClosedError(stream_id)
        self._out.append(_rst_stream(stream_id, error_code))

    def ping(self, opaque_data: bytes) -> None:
        self._out.append(_frame(PING, 0, 0, opaque_data))

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(stream_id)
        return min(self._send_window, stream.send_window)

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """Data grpclib has consumed: the windows open again once half of one is used."""
        self._recv_unacked += acknowledged_size
        if self._recv_unacked >= self._recv_window // 2:
            self._out.append(_window_update(0, self._recv_unacked))
            self._recv_left += self._recv_unacked
            self._recv_unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer sends nothing more on it
        stream.unacked += acknowledged_size
        if stream.unacked >= self.local_settings.initial_window_size // 2:
            self._out.append(_window_update(stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    # --- input ---------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[Event]:
        buf = self._in + data if self._in else data
        pos = 0
        if not self._preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 preface")
                self._in = buf
                return []
            if not buf.startswith(PREFACE):
                self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid HTTP/2 preface")
            self._preface_seen = True
            pos = len(PREFACE)
        events: list[Event] = []
        end = len(buf)
        while end - pos >= 9:
            word, flags, stream_id = _HEADER.unpack_from(buf, pos)
            length, kind = word >> 8, word & 0xFF
            if length > MIN_FRAME:  # our SETTINGS_MAX_FRAME_SIZE stays at the default
                self._fail(ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes", FrameTooLargeError)
            if end - pos - 9 < length:
                break
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if self._continuation is not None and kind != CONTINUATION:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "header block interrupted")
            handler = _FRAME_HANDLERS.get(kind)
            if handler is not None:  # frames of unknown types are ignored (RFC 9113 section 4.1)
                handler(self, flags, stream_id & MAX_WINDOW, payload, events)
        self._in = buf[pos:]
        return events

    def _fail(self, code: ErrorCodes, message: str, exc: type[ProtocolError] = ProtocolError) -> NoReturn:
        self._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(self._highest_stream_id, code)))
        self.state_machine.state = ConnectionState.CLOSED
        raise exc(message)

    def _reset(self, stream_id: int, code: ErrorCodes, events: list[Event]) -> None:
        """A stream error: the stream is reset and grpclib told so."""
        self.streams.pop(stream_id, None)
        self._out.append(_rst_stream(stream_id, code))
        events.append(StreamReset(stream_id=stream_id, error_code=code, remote_reset=False))

    def _unpadded(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            self._fail(ErrorCodes.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        data = self._unpadded(flags, payload)
        # Padding counts against the windows too (RFC 9113 section 6.9.1).
        self._recv_left -= len(payload)
        if self._recv_left < 0:
            self._fail(ErrorCodes.FLOW_CONTROL_ERROR, f"DATA of {len(payload)} bytes beyond the connection's "
                       "receive window", FlowControlError)
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            stream.recv_window -= len(payload)
            if stream.recv_window < 0:
                self._fail(ErrorCodes.FLOW_CONTROL_ERROR, f"DATA of {len(payload)} bytes beyond stream "
                           f"{stream_id}'s receive window", FlowControlError)
        if stream is None or stream.remote_closed:
            if stream is None and stream_id > self._highest_stream_id:
                self._fail(ErrorCodes.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            # Nobody reads it; the connection's window is given back right away.
            self.acknowledge_received_data(len(payload), 0)
            if stream is not None:
                self._reset(stream_id, ErrorCodes.STREAM_CLOSED, events)
            return
        received = DataReceived(stream_id=stream_id, data=data, flow_controlled_length=len(payload))
        events.append(received)
        if flags & END_STREAM:
            received.stream_ended = self._remote_end(stream, events)

    def _remote_end(self, stream: ServerStream, events: list[Event]) -> StreamEnded:
        stream.remote_closed = True
        if stream.local_closed:
            del self.streams[stream.stream_id]
        ended = StreamEnded(stream_id=stream.stream_id)
        events.append(ended)
        return ended

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = self._unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, bool(flags & END_STREAM), block, events)
        else:
            self._continuation = (stream_id, bool(flags & END_STREAM), [block])

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        assert self._continuation is not None
        self._continuation[2].append(payload)
        if sum(map(len, self._continuation[2])) > MAX_HEADER_BLOCK:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, "header block too long")
        if flags & END_HEADERS:
            sid, end_stream, parts = self._continuation
            self._continuation = None
            self._header_block(sid, end_stream, b"".join(parts), events)

    def _header_block(self, stream_id: int, end_stream: bool, block: bytes, events: list[Event]) -> None:
        # Decoded even for a stream that is refused or gone: the block may change the peer's table.
        headers = self._decode(block)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self._highest_stream_id:
                return  # a stream already closed (or reset by us): ignored
            self._highest_stream_id = stream_id
            if len(self.streams) >= MAX_CONCURRENT_STREAMS:
                self._out.append(_rst_stream(stream_id, ErrorCodes.REFUSED_STREAM))
                return
            stream = ServerStream(stream_id, self._peer_initial_window, self.local_settings.initial_window_size)
            self.streams[stream_id] = stream
            request = RequestReceived(stream_id=stream_id, headers=headers)  # type: ignore[arg-type]
            events.append(request)
            if end_stream:
                request.stream_ended = self._remote_end(stream, events)
            return
        if stream.remote_closed or not end_stream:
            # Trailers must end the stream; anything else after the request headers is malformed.
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR if not stream.remote_closed else
                        ErrorCodes.STREAM_CLOSED, events)
            return
        trailers = TrailersReceived(stream_id=stream_id, headers=headers)  # type: ignore[arg-type]
        events.append(trailers)
        trailers.stream_ended = self._remote_end(stream, events)

    def _decode(self, block: bytes) -> list[Any]:
        known = self._decoded.get(block)
        if known is not None:
            return list(known)  # a copy: grpclib's handler owns what it is given
        try:
            headers = self._decoder.decode(block)
        except hpack.HPACKError as e:
            self._fail(ErrorCodes.COMPRESSION_ERROR, f"header block: {e}")
        if indexed_only(block):
            if len(self._decoded) >= DECODED_BLOCKS:
                self._decoded.clear()
            self._decoded[block] = list(headers)
        else:
            # The peer's table may have changed: a cached block's indices may now name other fields.
            self._decoded.clear()
        return headers  # type: ignore[no-any-return]

    def _on_priority(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._reset(stream_id, ErrorCodes.FRAME_SIZE_ERROR, events)

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0 or stream_id > self._highest_stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"RST_STREAM on stream {stream_id}")
        if len(payload) != 4:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM of wrong length", FrameTooLargeError)
        now = time.monotonic()
        if now - self._resets_since > RESET_INTERVAL:
            self._resets, self._resets_since = 0, now
        self._resets += 1
        if self._resets > MAX_RESETS:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, f"more than {MAX_RESETS} streams reset within "
                       f"{RESET_INTERVAL:g}s")
        if self.streams.pop(stream_id, None) is not None:
            code = _U32.unpack(payload)[0]
            events.append(StreamReset(stream_id=stream_id, error_code=_error_code(code), remote_reset=True))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ack with a body", FrameTooLargeError)
            events.append(SettingsAcknowledged())
            return
        if len(payload) % 6:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS of wrong length", FrameTooLargeError)
        changed = RemoteSettingsChanged()
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            original: int | None = None
            if code == SettingCodes.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(ErrorCodes.FLOW_CONTROL_ERROR, f"initial window size {value}")
                original, delta = self._peer_initial_window, value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif code == SettingCodes.MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= MAX_FRAME:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, f"max frame size {value}")
                original, self.max_outbound_frame_size = self.max_outbound_frame_size, value
            elif code == SettingCodes.HEADER_TABLE_SIZE and value < 4096:
                # Our table is empty and stays so, but the peer may only learn its new size from us
                # (RFC 7541 section 4.2): the next header block starts with the update.
                self._table_size_update = _hpack_int(value, 5, 0x20)
            elif code == SettingCodes.ENABLE_PUSH and value > 1:
                self._fail(ErrorCodes.PROTOCOL_ERROR, f"enable push {value}")
            try:
                key: int = SettingCodes(code)
            except ValueError:
                key = code
            changed.changed_settings[key] = ChangedSetting(key, original, value)
        self._out.append(_frame(SETTINGS, ACK, 0))
        events.append(changed)

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        self._fail(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "PING of wrong length", FrameTooLargeError)
        if flags & ACK:
            events.append(PingAckReceived(ping_data=payload))
        else:
            self._out.append(_frame(PING, ACK, 0, payload))
            events.append(PingReceived(ping_data=payload))

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0 or len(payload) < 8:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "malformed GOAWAY")
        last, code = _GOAWAY.unpack_from(payload)
        self.state_machine.state = ConnectionState.CLOSED
        terminated = ConnectionTerminated()
        terminated.error_code, terminated.last_stream_id = _error_code(code), last & MAX_WINDOW
        terminated.additional_data = payload[8:]
        events.append(terminated)

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong length", FrameTooLargeError)
        increment = _U32.unpack(payload)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            events.append(WindowUpdated(stream_id=0, delta=increment))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._highest_stream_id:
                self._fail(ErrorCodes.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a closed stream: may still arrive, and means nothing
        if increment == 0:
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream_id, ErrorCodes.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(stream_id=stream_id, delta=increment))


# A class-level table (not bound methods kept on each connection): no reference cycle per connection.
_FRAME_HANDLERS = {
    DATA: ServerConnection._on_data,
    HEADERS: ServerConnection._on_headers,
    PRIORITY: ServerConnection._on_priority,
    RST_STREAM: ServerConnection._on_rst_stream,
    SETTINGS: ServerConnection._on_settings,
    PUSH_PROMISE: ServerConnection._on_push_promise,
    PING: ServerConnection._on_ping,
    GOAWAY: ServerConnection._on_goaway,
    WINDOW_UPDATE: ServerConnection._on_window_update,
    CONTINUATION: ServerConnection._on_continuation,
}


def _error_code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code
