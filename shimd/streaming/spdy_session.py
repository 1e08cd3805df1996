"""Server side of a SPDY/3.1 session: frame loop, streams, flow control.

Flow control follows SPDY/3.1: both the stream and the session window start at 64 KiB; we send
WINDOW_UPDATE as the consumer reads (not as bytes arrive), and we never send beyond the peer's
windows. moby/spdystream (kubectl, crictl, kubelet) neither sends WINDOW_UPDATE nor honours it
(checked with kubectl 1.32), so a peer that has never sent a WINDOW_UPDATE or SETTINGS frame and
leaves us blocked on an exhausted window for FLOW_PROBE_SECONDS is treated as not doing flow
control for the rest of the session; TCP backpressure (we await drain) still bounds what we buffer.
A peer that has shown flow control once is held to its windows for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from shimd.streaming import spdy_frames as sf

# Short, because every real client is spdystream and pays this once per session past 64 KiB.
FLOW_PROBE_SECONDS = 0.25
# A peer without flow control can outrun a slow consumer; past this we stop reading the socket.
INBOUND_HIGH_WATER = 1 << 20
MAX_DATA_CHUNK = 32 * 1024
# Open streams per session: each costs buffers and, for port-forward, a dial; a client past this is refused.
MAX_STREAMS = 512
# Like kubelet's stream idle timeout: a session with no frames at all for this long is dropped.
IDLE_TIMEOUT_SECONDS = 4 * 3600.0


class SpdyStream:
    def __init__(self, session: SpdySession, stream_id: int, headers: sf.Headers, remote_fin: bool,
                 unidirectional: bool) -> None:
        self._session = session
        self.id = stream_id
        self.headers = headers
        self._inbuf = bytearray()
        self.remote_closed = remote_fin
        self.local_closed = unidirectional
        self.was_reset = False
        self.replied = False
        self.send_window = session.peer_initial_window
        self._unacked = 0
        self._discard = False
        self._changed = asyncio.Event()

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b"" once the peer has finished (FIN), reset the stream, or gone away.
        Waits as long as the session lives: session teardown wakes every reader."""
        while not self._inbuf and not self.remote_closed:
            self._changed.clear()
            await self._changed.wait()
        if not self._inbuf:
            return b""
        chunk = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        self._session._consumed(self, len(chunk))
        return chunk

    def discard(self) -> None:
        """Nobody will read this stream: drop what arrives, but keep the peer's window open."""
        self._discard = True
        if self._inbuf:
            n = len(self._inbuf)
            self._inbuf.clear()
            self._session._consumed(self, n)

    async def write(self, data: bytes) -> None:
        await self._session._send_data(self, data)

    def close(self) -> None:
        """Half-close our side (FIN). Idempotent."""
        self._session._send_fin(self)

    def reset(self, status: int = sf.CANCEL) -> None:
        self._session._reset_stream(self, status)

    # Called by the session.
    def _deliver(self, data: bytes) -> None:
        if self._discard:
            self._session._consumed(self, len(data))
            return
        self._inbuf += data
        self._changed.set()

    def _finish_remote(self) -> None:
        self.remote_closed = True
        self._changed.set()

    @property
    def buffered(self) -> int:
        return len(self._inbuf)


class SpdySession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_stream: Callable[[SpdyStream], None], log: Any) -> None:
        self._reader, self._writer, self._on_stream, self._log = reader, writer, on_stream, log
        self._codec = sf.HeaderCodec()
        self.streams: dict[int, SpdyStream] = {}
        self.peer_initial_window = sf.DEFAULT_WINDOW
        self._send_window = sf.DEFAULT_WINDOW
        self._session_unacked = 0
        self._peer_flow_control = False
        self._ignore_windows = False
        self._window_changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_peer_stream = 0
        self.closed = asyncio.Event()

    # ---- frame loop -------------------------------------------------------------------------
    async def run(self) -> None:
        """Read frames until the peer closes the connection or breaks the protocol."""
        try:
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT_SECONDS):
                    head = await self._reader.readexactly(8)
                    is_control, kind_or_id, flags, length = sf.split_header(head)
                    body = await self._reader.readexactly(length) if length else b""
                if is_control:
                    self._on_control(sf.parse_control(self._codec, kind_or_id, flags, body))
                else:
                    await self._on_data(kind_or_id, flags, body)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except sf.SpdyProtocolError as e:
            self._log.warning("spdy protocol error", error=str(e))
            self._send(sf.goaway(self._last_peer_stream, 1))
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self.closed.set()
        for stream in self.streams.values():
            stream.local_closed = True
            stream._finish_remote()
        self._notify_window()

    def _send(self, frame: bytes) -> None:
        if not self._writer.transport.is_closing():
            self._writer.write(frame)

    def _on_control(self, f: sf.Frame) -> None:
        if f.kind == sf.SYN_STREAM:
            self._on_syn_stream(f)
        elif f.kind == sf.RST_STREAM:
            stream = self.streams.pop(f.stream_id, None)
            if stream is not None:
                stream.was_reset = stream.local_closed = True
                stream._finish_remote()
                self._notify_window()
        elif f.kind == sf.SETTINGS:
            self._peer_flow_control = True
            if sf.SETTINGS_INITIAL_WINDOW_SIZE in f.settings:
                new = f.settings[sf.SETTINGS_INITIAL_WINDOW_SIZE]
                delta, self.peer_initial_window = new - self.peer_initial_window, new
                for stream in self.streams.values():
                    stream.send_window += delta
            self._notify_window()
        elif f.kind == sf.PING:
            if f.ping_id % 2 == 1:  # client-initiated ids are odd; ours would be even
                self._send(sf.ping(f.ping_id))
        elif f.kind == sf.WINDOW_UPDATE:
            self._peer_flow_control = True
            if f.stream_id == 0:
                self._send_window += f.delta
            elif (stream := self.streams.get(f.stream_id)) is not None:
                stream.send_window += f.delta
                if stream.send_window > sf.MAX_WINDOW:
                    self._reset_stream(stream, sf.FLOW_CONTROL_ERROR)
            self._notify_window()
        elif f.kind == sf.HEADERS:
            if f.flags & sf.FLAG_FIN and (stream := self.streams.get(f.stream_id)) is not None:
                self._remote_fin(stream)
        # SYN_REPLY (we open no streams), GOAWAY (we open none either) and unknown types: ignored.

    def _on_syn_stream(self, f: sf.Frame) -> None:
        if f.stream_id % 2 == 0 or f.stream_id <= self._last_peer_stream:
            self._send(sf.rst_stream(f.stream_id, sf.PROTOCOL_ERROR))
            return
        self._last_peer_stream = f.stream_id
        if len(self.streams) >= MAX_STREAMS:
            self._send(sf.rst_stream(f.stream_id, sf.REFUSED_STREAM))
            return
        stream = SpdyStream(self, f.stream_id, f.headers, bool(f.flags & sf.FLAG_FIN),
                            bool(f.flags & sf.FLAG_UNIDIRECTIONAL))
        self.streams[f.stream_id] = stream
        self._on_stream(stream)

    async def _on_data(self, stream_id: int, flags: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self._session_unacked += len(data)
            self._ack_session()
            self._send(sf.rst_stream(stream_id, sf.INVALID_STREAM))
            return
        if data:
            stream._deliver(data)
        if flags & sf.FLAG_FIN:
            self._remote_fin(stream)
        while stream.buffered > INBOUND_HIGH_WATER and not stream.remote_closed:
            # Only a peer ignoring our window gets here; stalling the socket is the backpressure left.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stream._changed.wait()
            stream._changed.clear()
            if self._writer.transport.is_closing():
                return

    def _remote_fin(self, stream: SpdyStream) -> None:
        stream._finish_remote()
        if stream.local_closed:
            self.streams.pop(stream.id, None)

    # ---- receive-side flow control ----------------------------------------------------------
    def _consumed(self, stream: SpdyStream, n: int) -> None:
        stream._changed.set()  # wakes a frame loop waiting on INBOUND_HIGH_WATER
        if not stream.remote_closed:
            stream._unacked += n
            if stream._unacked >= sf.DEFAULT_WINDOW // 2:
                self._send(sf.window_update(stream.id, stream._unacked))
                stream._unacked = 0
        self._session_unacked += n
        self._ack_session()

    def _ack_session(self) -> None:
        if self._session_unacked >= sf.DEFAULT_WINDOW // 2:
            self._send(sf.window_update(0, self._session_unacked))
            self._session_unacked = 0

    # ---- send side ---------------------------------------------------------------------------
    def reply(self, stream: SpdyStream) -> None:
        """Accept a peer's stream (SYN_REPLY with no headers, as kubelet does)."""
        if not stream.replied:
            stream.replied = True
            self._send(sf.syn_reply(self._codec, stream.id, {}))

    def _notify_window(self) -> None:
        if not self._window_changed.done():
            self._window_changed.set_result(None)
        self._window_changed = asyncio.get_running_loop().create_future()

    async def _take_window(self, stream: SpdyStream, want: int) -> int:
        while True:
            if stream.local_closed or self.closed.is_set():
                raise ConnectionResetError(f"spdy stream {stream.id} is closed")
            if self._ignore_windows:
                return want
            avail = min(stream.send_window, self._send_window)
            if avail > 0:
                n = min(avail, want)
                stream.send_window -= n
                self._send_window -= n
                return n
            waiter = self._window_changed
            if self._peer_flow_control:
                # Shielded: a cancelled sender must not cancel the future other senders share.
                await asyncio.shield(waiter)
                continue
            try:
                async with asyncio.timeout(FLOW_PROBE_SECONDS):
                    await asyncio.shield(waiter)
            except TimeoutError:
                if not self._peer_flow_control:
                    self._log.info("spdy peer sends no WINDOW_UPDATE; not enforcing its window")
                    self._ignore_windows = True

    async def _send_data(self, stream: SpdyStream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self._take_window(stream, min(len(view), MAX_DATA_CHUNK))
            self._send(sf.data_frame(stream.id, bytes(view[:n])))
            view = view[n:]
            await self._writer.drain()

    def _send_fin(self, stream: SpdyStream) -> None:
        if stream.local_closed:
            return
        stream.local_closed = True
        self._send(sf.data_frame(stream.id, b"", fin=True))
        if stream.remote_closed:
            self.streams.pop(stream.id, None)

    def _reset_stream(self, stream: SpdyStream, status: int) -> None:
        if not stream.was_reset:
            stream.was_reset = stream.local_closed = True
            self._send(sf.rst_stream(stream.id, status))
            stream._finish_remote()
            self.streams.pop(stream.id, None)
            self._notify_window()

    async def finish(self, linger: float) -> None:
        """End the session from our side: FIN every stream, let the client close first (so our
        last bytes are not lost to a reset caused by its unread data), then GOAWAY and close."""
        for stream in list(self.streams.values()):
            stream.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(linger):
                await self._writer.drain()
                await self.closed.wait()
        self._send(sf.goaway(self._last_peer_stream, 0))
        self.close()

    def close(self) -> None:
        self._writer.close()
