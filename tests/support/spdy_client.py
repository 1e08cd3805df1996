"""An independent SPDY/3.1 client for tests, written from the SPDY/3.1 draft and the Kubernetes
remotecommand/portforward conventions. It shares no code with shimd.streaming on purpose.

Client-side flow control is real (64 KiB stream and session windows; WINDOW_UPDATE as the test reads),
unless flow_control=False, which behaves like moby/spdystream: never sends WINDOW_UPDATE, ignores the
server's windows.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# SPDY/3 header compression dictionary, transcribed from the byte table in the spec (2.6.10.1).
_DICT_HEX = """
000000076f7074696f6e73000000046865616400000004706f7374000000037075740000000664656c65746500000005
7472616365000000066163636570740000000e6163636570742d636861727365740000000f6163636570742d656e636f
64696e670000000f6163636570742d6c616e67756167650000000d6163636570742d72616e6765730000000361676500
000005616c6c6f770000000d617574686f72697a6174696f6e0000000d63616368652d636f6e74726f6c0000000a636f
6e6e656374696f6e0000000c636f6e74656e742d6261736500000010636f6e74656e742d656e636f64696e6700000010
636f6e74656e742d6c616e67756167650000000e636f6e74656e742d6c656e67746800000010636f6e74656e742d6c6f
636174696f6e0000000b636f6e74656e742d6d64350000000d636f6e74656e742d72616e67650000000c636f6e74656e
742d74797065000000046461746500000004657461670000000665787065637400000007657870697265730000000466
726f6d00000004686f73740000000869662d6d617463680000001169662d6d6f6469666965642d73696e63650000000d
69662d6e6f6e652d6d617463680000000869662d72616e67650000001369662d756e6d6f6469666965642d73696e6365
0000000d6c6173742d6d6f646966696564000000086c6f636174696f6e0000000c6d61782d666f727761726473000000
06707261676d610000001270726f78792d61757468656e7469636174650000001370726f78792d617574686f72697a61
74696f6e0000000572616e676500000007726566657265720000000b72657472792d6166746572000000067365727665
7200000002746500000007747261696c6572000000117472616e736665722d656e636f64696e67000000077570677261
64650000000a757365722d6167656e74000000047661727900000003766961000000077761726e696e67000000107777
772d61757468656e746963617465000000066d6574686f64000000036765740000000673746174757300000006323030
204f4b0000000776657273696f6e00000008485454502f312e310000000375726c000000067075626c69630000000a73
65742d636f6f6b69650000000a6b6565702d616c697665000000066f726967696e313030313031323031323032323035
323036333030333032333033333034333035333036333037343032343035343036343037343038343039343130343131
343132343133343134343135343136343137353032353034353035323033204e6f6e2d417574686f7269746174697665
20496e666f726d6174696f6e323034204e6f20436f6e74656e74333031204d6f766564205065726d616e656e746c7934
303020426164205265717565737434303120556e617574686f72697a656434303320466f7262696464656e343034204e
6f7420466f756e6435303020496e7465726e616c20536572766572204572726f72353031204e6f7420496d706c656d65
6e746564353033205365727669636520556e617661696c61626c654a616e20466562204d617220417072204d6179204a
756e204a756c204175672053657074204f6374204e6f76204465632030303a30303a3030204d6f6e2c205475652c2057
65642c205468752c204672692c205361742c2053756e2c20474d546368756e6b65642c746578742f68746d6c2c696d61
67652f706e672c696d6167652f6a70672c696d6167652f6769662c6170706c69636174696f6e2f786d6c2c6170706c69
636174696f6e2f7868746d6c2b786d6c2c746578742f706c61696e2c746578742f6a6176617363726970742c7075626c
6963707269766174656d61782d6167653d677a69702c6465666c6174652c73646368636861727365743d7574662d3863
6861727365743d69736f2d383835392d312c7574662d2c2a2c656e713d302e"""
SPDY3_DICTIONARY = bytes.fromhex("".join(_DICT_HEX.split()))

CTRL_SYN_STREAM, CTRL_SYN_REPLY, CTRL_RST, CTRL_SETTINGS = 1, 2, 3, 4
CTRL_PING, CTRL_GOAWAY, CTRL_HEADERS, CTRL_WINDOW_UPDATE = 6, 7, 8, 9
FIN = 1
WINDOW = 65536


class UpgradeRejected(Exception):
    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        super().__init__(f"upgrade rejected with HTTP {status}: {body[:200]!r}")
        self.status, self.headers, self.body = status, headers, body


def _ctrl(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack("!HHI", 0x8003, kind, flags << 24 | len(payload)) + payload


@dataclass
class ClientStream:
    client: SpdyClient
    sid: int
    headers: dict[str, str]
    buf: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset_status: int | None = None
    replied: asyncio.Event = field(default_factory=asyncio.Event)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    send_window: int = WINDOW
    recv_window: int = WINDOW
    unacked: int = 0
    local_closed: bool = False

    async def read(self, n: int = 65536, timeout: float = 30) -> bytes:
        async with asyncio.timeout(timeout):
            while not self.buf and not self.eof:
                self.event.clear()
                await self.event.wait()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.client._consumed(self, len(out))
        return out

    async def read_all(self, timeout: float = 30) -> bytes:
        out = bytearray()
        async with asyncio.timeout(timeout):
            while chunk := await self.read(timeout=timeout):
                out += chunk
        return bytes(out)

    async def write(self, data: bytes) -> None:
        await self.client._send_data(self, data)

    def close(self) -> None:
        if not self.local_closed:
            self.local_closed = True
            self.client._write(struct.pack("!II", self.sid, FIN << 24))


class SpdyClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str,
                 flow_control: bool) -> None:
        self.reader, self.writer, self.protocol, self.flow_control = reader, writer, protocol, flow_control
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, SPDY3_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self.streams: dict[int, ClientStream] = {}
        self.next_id = 1
        self.session_window = WINDOW
        self.session_unacked = 0
        self.session_recv_window = WINDOW
        self.window_event = asyncio.Event()
        self.goaway = False
        self.closed = asyncio.Event()
        self.frames_seen: list[int] = []
        self.window_violations = 0  # data the server sent beyond our advertised windows
        self.update_threshold = WINDOW // 4  # consumed bytes that trigger a stream WINDOW_UPDATE
        self._task = asyncio.ensure_future(self._loop())

    @classmethod
    async def connect(cls, url: str, protocols: list[str], *, flow_control: bool = True,
                      ssl_ctx: ssl.SSLContext | None = None, timeout: float = 10) -> SpdyClient:
        u = urlsplit(url)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(u.hostname, u.port, ssl=ssl_ctx)
            lines = [f"POST {u.path}{'?' + u.query if u.query else ''} HTTP/1.1", f"Host: {u.netloc}",
                     "Connection: Upgrade", "Upgrade: SPDY/3.1", "Content-Length: 0"]
            lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, list[str]] = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.setdefault(k.strip().lower(), []).append(v.strip())
        if status != 101:
            length = int(headers.get("content-length", ["0"])[0])
            body = await reader.readexactly(length) if length else b""
            writer.close()
            raise UpgradeRejected(status, headers, body)
        return cls(reader, writer, headers.get("x-stream-protocol-version", [""])[0], flow_control)

    # ---- sending --------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not self.writer.transport.is_closing():
            self.writer.write(data)

    def _headers_block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack("!I", len(headers))
        for k, v in headers.items():
            kb, vb = k.lower().encode(), v.encode()
            raw += struct.pack("!I", len(kb)) + kb + struct.pack("!I", len(vb)) + vb
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str], wait_reply: bool = True) -> ClientStream:
        sid, self.next_id = self.next_id, self.next_id + 2
        st = ClientStream(self, sid, headers)
        self.streams[sid] = st
        self._write(_ctrl(CTRL_SYN_STREAM, 0, struct.pack("!IIH", sid, 0, 0) + self._headers_block(headers)))
        if wait_reply:
            async with asyncio.timeout(10):
                await st.replied.wait()
        return st

    async def _send_data(self, st: ClientStream, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), 16384)
            if self.flow_control:
                async with asyncio.timeout(30):
                    while min(st.send_window, self.session_window) <= 0:
                        if st.reset_status is not None or self.closed.is_set():
                            raise ConnectionResetError("stream gone")
                        self.window_event.clear()
                        await self.window_event.wait()
                n = min(n, st.send_window, self.session_window)
                st.send_window -= n
                self.session_window -= n
            self._write(struct.pack("!II", st.sid, n) + bytes(view[:n]))
            view = view[n:]
            await self.writer.drain()

    def _consumed(self, st: ClientStream, n: int) -> None:
        if not self.flow_control or n == 0:
            return
        st.unacked += n
        self.session_unacked += n
        if st.unacked >= self.update_threshold and not st.eof:
            self._write(_ctrl(CTRL_WINDOW_UPDATE, 0, struct.pack("!II", st.sid, st.unacked)))
            st.recv_window += st.unacked
            st.unacked = 0
        if self.session_unacked >= WINDOW // 4:
            self._write(_ctrl(CTRL_WINDOW_UPDATE, 0, struct.pack("!II", 0, self.session_unacked)))
            self.session_recv_window += self.session_unacked
            self.session_unacked = 0

    def ping(self, ping_id: int = 1) -> None:
        self._write(_ctrl(CTRL_PING, 0, struct.pack("!I", ping_id)))

    # ---- receiving ------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            while True:
                hdr = await self.reader.readexactly(8)
                a, b = struct.unpack("!II", hdr)
                flags, length = b >> 24, b & 0xFFFFFF
                body = await self.reader.readexactly(length)
                if a & 0x80000000:
                    self._control(a & 0xFFFF, flags, body)
                else:
                    st = self.streams.get(a & 0x7FFFFFFF)
                    if st is None:
                        continue
                    if self.flow_control:
                        st.recv_window -= len(body)
                        self.session_recv_window -= len(body)
                        if st.recv_window < 0 or self.session_recv_window < 0:
                            self.window_violations += 1
                    st.buf += body
                    if flags & FIN:
                        st.eof = True
                    st.event.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            for st in self.streams.values():
                st.eof = True
                st.event.set()
                st.replied.set()
            self.window_event.set()

    def _control(self, kind: int, flags: int, body: bytes) -> None:
        self.frames_seen.append(kind)
        if kind == CTRL_SYN_REPLY:
            (sid,) = struct.unpack_from("!I", body)
            self.inflate.decompress(body[4:])  # keep the shared zlib stream in step
            if (st := self.streams.get(sid & 0x7FFFFFFF)) is not None:
                st.replied.set()
                if flags & FIN:
                    st.eof = True
                    st.event.set()
        elif kind == CTRL_HEADERS:
            self.inflate.decompress(body[4:])
        elif kind == CTRL_RST:
            sid, status = struct.unpack_from("!II", body)
            if (st := self.streams.get(sid)) is not None:
                st.reset_status, st.eof = status, True
                st.event.set()
                st.replied.set()
                self.window_event.set()
        elif kind == CTRL_WINDOW_UPDATE:
            sid, delta = struct.unpack_from("!II", body)
            if sid == 0:
                self.session_window += delta
            elif (st := self.streams.get(sid)) is not None:
                st.send_window += delta
            self.window_event.set()
        elif kind == CTRL_SETTINGS:
            (count,) = struct.unpack_from("!I", body)
            for i in range(count):
                key, value = struct.unpack_from("!II", body, 4 + 8 * i)
                if key & 0xFFFFFF == 7:
                    for st in self.streams.values():
                        st.send_window += value - WINDOW
            self.window_event.set()
        elif kind == CTRL_PING:
            (pid,) = struct.unpack_from("!I", body)
            if pid % 2 == 0:
                self._write(_ctrl(CTRL_PING, 0, body))
        elif kind == CTRL_GOAWAY:
            self.goaway = True

    async def close(self) -> None:
        self.writer.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    status: bytes

    @property
    def status_json(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.status)
        return parsed


async def open_remotecommand(client: SpdyClient, *, stdin: bool, stdout: bool, stderr: bool,
                             tty: bool) -> dict[str, ClientStream]:
    """Open the streams the way kubectl/crictl do: error first, then stdin/stdout/stderr, then resize."""
    streams = {"error": await client.open_stream({"streamType": "error"})}
    for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr and not tty)):
        if wanted:
            streams[name] = await client.open_stream({"streamType": name})
    if tty and client.protocol in ("v4.channel.k8s.io", "v3.channel.k8s.io"):
        streams["resize"] = await client.open_stream({"streamType": "resize"})
    return streams


async def run_remotecommand(url: str, *, stdin_data: bytes | None = None, stdout: bool = True,
                            stderr: bool = True, tty: bool = False, flow_control: bool = True,
                            protocols: tuple[str, ...] = ("v4.channel.k8s.io",),
                            timeout: float = 30) -> ExecResult:
    client = await SpdyClient.connect(url, list(protocols), flow_control=flow_control)
    try:
        s = await open_remotecommand(client, stdin=stdin_data is not None, stdout=stdout, stderr=stderr, tty=tty)

        async def feed() -> None:
            if stdin_data is not None:
                await s["stdin"].write(stdin_data)
                s["stdin"].close()

        async def drain(name: str) -> bytes:
            return await s[name].read_all(timeout) if name in s else b""

        async with asyncio.timeout(timeout):
            _, out, err, status = await asyncio.gather(feed(), drain("stdout"), drain("stderr"), drain("error"))
        return ExecResult(out, err, status)
    finally:
        await client.close()


async def run_tty_resized(url: str, width: int, height: int, timeout: float = 30) -> bytes:
    """A TTY exec (stdout only) that sends one terminal resize first; returns what the command printed."""
    client = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    try:
        s = await open_remotecommand(client, stdin=False, stdout=True, stderr=False, tty=True)
        await s["resize"].write(json.dumps({"Width": width, "Height": height}).encode())
        async with asyncio.timeout(timeout):
            out, _ = await asyncio.gather(s["stdout"].read_all(timeout), s["error"].read_all(timeout))
        return out
    finally:
        await client.close()
