"""Process stdio for shims: opening the URIs the task API passes and copying bytes.

URIs: "" = /dev/null; a plain path = a FIFO (copied through the shim so a vanished reader never
hurts the process) or a regular file (handed to the process as is); file:///abs = append raw
output (handed to the process directly); crilog:///abs = CRI log format, written by the shim's
writer thread. Copies run on the event loop with non-blocking descriptors; when a destination
cannot keep up, the source is paused (back-pressure) instead of buffering without bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable

from shimproto.messages import ATTACH_STDERR, ATTACH_STDOUT
from shims.common import aio
from shims.common.writer import FileWriter

CRI_LINE_MAX = 16 * 1024
_BACKLOG_MAX = 256 * 1024
_CHUNK = 32 * 1024
# An attached client this far behind is disconnected (see AttachFanout).
ATTACH_BACKLOG_MAX = 1 << 20


def cri_timestamp(ns: int) -> bytes:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
            + f".{ns % 1_000_000_000:09d}Z").encode()


class CriLogSink:
    """Formats output as `<RFC3339Nano UTC> <stream> <F|P> <content>\\n` into one log file."""

    def __init__(self, writer: FileWriter, path: str) -> None:
        self.writer, self.path = writer, path
        self._partial: dict[bytes, bytearray] = {b"stdout": bytearray(), b"stderr": bytearray()}

    def feed(self, stream: bytes, data: bytes) -> bool:
        """Returns False when the writer is backed up (the caller pauses its source)."""
        buf = self._partial[stream]
        buf += data
        out: list[bytes] = []
        ts = cri_timestamp(time.time_ns())
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self._emit(out, ts, stream, bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]
        while len(buf) > CRI_LINE_MAX:
            out.append(b"%s %s P %s\n" % (ts, stream, bytes(buf[:CRI_LINE_MAX])))
            del buf[:CRI_LINE_MAX]
        if out:
            return self.writer.append(self.path, b"".join(out))
        return True

    def _emit(self, out: list[bytes], ts: bytes, stream: bytes, line: bytes) -> None:
        while len(line) > CRI_LINE_MAX:
            out.append(b"%s %s P %s\n" % (ts, stream, line[:CRI_LINE_MAX]))
            line = line[CRI_LINE_MAX:]
        out.append(b"%s %s F %s\n" % (ts, stream, line))

    def flush(self, stream: bytes) -> None:
        """At EOF an unterminated last line is complete: write it as F."""
        buf = self._partial[stream]
        if buf:
            out: list[bytes] = []
            self._emit(out, cri_timestamp(time.time_ns()), stream, bytes(buf))
            buf.clear()
            self.writer.append(self.path, b"".join(out))

    async def reopen(self, timeout: float) -> None:
        """After the client renamed the file: a new one exists at the path when this returns."""
        try:
            async with aio.timeout(timeout):
                await self.writer.open(self.path, fresh=True)
        except TimeoutError:
            raise TimeoutError(f"log file {self.path} was not reopened within {timeout:g}s") from None


class FdSink:
    """Non-blocking writes to a descriptor (a FIFO or a pty/pipe); reports when it is backed up."""

    def __init__(self, fd: int, on_drained: Callable[[], None]) -> None:
        self.fd = fd
        self._backlog = bytearray()
        self._on_drained = on_drained
        self._loop = aio.get_running_loop()
        self._writing = False
        self._closing = False
        self.closed = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> bool:
        """Returns False when the caller should pause its source until on_drained is called."""
        if self.closed:
            return True
        if not self._backlog:
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                pass
            except OSError:  # reader gone (EPIPE) or tty hung up: drop, the process must not stall
                return True
        if data:
            self._backlog += data
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self.fd, self._drain)
        return len(self._backlog) < _BACKLOG_MAX

    def _drain(self) -> None:
        try:
            n = os.write(self.fd, self._backlog)
            del self._backlog[:n]
        except BlockingIOError:
            return
        except OSError:
            self._backlog.clear()
        if not self._backlog:
            self._loop.remove_writer(self.fd)
            self._writing = False
            if self._closing:
                self.close()
            else:
                self._on_drained()

    def finish(self) -> None:
        """Close once the backlog is written (the source reached EOF)."""
        if self._backlog and not self.closed:
            self._closing = True
        else:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writing:
            self._loop.remove_writer(self.fd)
        self._backlog.clear()
        os.close(self.fd)


class Pump:
    """Copies a readable descriptor to a callable sink until EOF (or EIO from a pty master)."""

    def __init__(self, fd: int, sink: Callable[[bytes], bool], on_eof: Callable[[], None], owns_fd: bool = True):
        self.fd, self.sink, self.on_eof, self.owns_fd = fd, sink, on_eof, owns_fd
        self._loop = aio.get_running_loop()
        self.done: aio.Future[None] = self._loop.create_future()
        self._paused = False
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side is closed
            data = b""
        if not data:
            self.stop()
            return
        if not self.sink(data) and not self._paused:
            self._paused = True
            self._loop.remove_reader(self.fd)

    def drain_now(self) -> None:
        """Hand the sink whatever is readable right now (input queued before a CloseIO)."""
        if self.done.done():
            return
        while True:
            try:
                data = os.read(self.fd, _CHUNK)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self.sink(data)

    def resume(self) -> None:
        if self._paused and not self.done.done():
            self._paused = False
            self._loop.add_reader(self.fd, self._readable)

    def stop(self) -> None:
        if self.done.done():
            return
        self._loop.remove_reader(self.fd)
        if self.owns_fd:
            os.close(self.fd)
        self.on_eof()
        self.done.set_result(None)


class AttachFanout:
    """A process's output, as it comes, to every client connected to a unix socket (shimd's Attach).

    Independent of any log file: a container without one can be attached to, and clients see partial
    lines (prompts) at once. Frames: stream byte (1 stdout, 2 stderr), 4-byte big-endian length, bytes.
    Output nobody is connected for is dropped; a client that falls ATTACH_BACKLOG_MAX behind is
    disconnected rather than slowing the process down or growing the shim.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._loop = aio.get_running_loop()
        self._clients: dict[socket.socket, bytearray] = {}
        self._closing = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an earlier task of the same id
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)  # container output: for root (shimd) only
            sock.listen(8)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        if self._sock is None:
            return
        try:
            conn, _ = self._sock.accept()
        except OSError:  # BlockingIOError, or the client gave up already
            return
        conn.setblocking(False)
        self._clients[conn] = bytearray()
        # Clients send nothing: readable means they hung up.
        self._loop.add_reader(conn.fileno(), self._hangup, conn)

    def _hangup(self, conn: socket.socket) -> None:
        try:
            if conn.recv(4096):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        if self._clients.pop(conn, None) is None:
            return
        self._loop.remove_reader(conn.fileno())
        self._loop.remove_writer(conn.fileno())
        conn.close()

    def send(self, stream: int, data: bytes) -> None:
        if not self._clients or not data:
            return
        frame = bytes((stream,)) + len(data).to_bytes(4, "big") + data
        for conn, backlog in list(self._clients.items()):
            if backlog:
                backlog += frame
                if len(backlog) > ATTACH_BACKLOG_MAX:
                    self._drop(conn)
                continue
            try:
                n = conn.send(frame)
            except BlockingIOError:
                n = 0
            except OSError:
                self._drop(conn)
                continue
            if n < len(frame):
                backlog += frame[n:]
                self._loop.add_writer(conn.fileno(), self._flush, conn)

    def _flush(self, conn: socket.socket) -> None:
        backlog = self._clients.get(conn)
        if backlog is None:
            return
        try:
            del backlog[:conn.send(backlog)]
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        if not backlog:
            self._loop.remove_writer(conn.fileno())
            if self._closing:
                self._drop(conn)

    def finish(self) -> None:
        """The output reached EOF: clients are disconnected once they have what was sent; no new ones."""
        self._closing = True
        self._stop_listening()
        for conn, backlog in list(self._clients.items()):
            if not backlog:
                self._drop(conn)

    def _stop_listening(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def close(self) -> None:
        self._stop_listening()
        for conn in list(self._clients):
            self._drop(conn)


def _is_fifo(path: str) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISFIFO(os.stat(path).st_mode)
    return False


def output_target(uri: str) -> tuple[str, str]:
    """(kind, path): kind is null | fifo | file | crilog."""
    if not uri:
        return "null", ""
    if uri.startswith("crilog://"):
        return "crilog", uri[len("crilog://"):]
    if uri.startswith("file://"):
        return "file", uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported stdio URI scheme in {uri!r}")
    return ("fifo" if _is_fifo(uri) else "file"), uri


class ProcessIO:
    """The stdio of one process: descriptors to hand to runc, and the copies the shim runs."""

    def __init__(self, writer: FileWriter, stdin: str, stdout: str, stderr: str, terminal: bool,
                 attach: AttachFanout | None = None) -> None:
        self.writer = writer
        self.uris = (stdin, stdout, stderr)
        self.terminal = terminal
        self.attach = attach  # gets the output too (a container's init); owned from here on
        self.child_fds: list[int] = []  # given to runc, closed in the shim once runc has them
        self.stdio: tuple[int, int, int] = (-1, -1, -1)
        self.pumps: list[Pump] = []
        self.sinks: list[FdSink] = []
        self.cri: CriLogSink | None = None
        self.stdin_sink: FdSink | None = None
        self.stdin_pump: Pump | None = None
        self._stdin_fifo = -1
        self._stdin_keeper = -1
        self._stdin_w = -1
        self.console = -1
        self._pending_out: list[tuple[int, str, bytes]] = []  # (read fd, uri, stream) for non-terminal copies

    # -- set-up before runc runs ------------------------------------------------------------------
    def prepare(self) -> None:
        """Open every descriptor; on error everything opened so far is closed."""
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        self.child_fds.append(fd)
        return fd

    def _prepare(self) -> None:
        stdin, stdout, stderr = self.uris
        null_in = self._keep(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        fds = [null_in, -1, -1]
        if stdin:
            kind, path = output_target(stdin)
            if kind == "fifo":
                # O_NONBLOCK open never waits for a writer; epoll reports nothing until one appears.
                self._stdin_fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                # Our own writer keeps the FIFO from reading as EOF while no client is attached (or
                # shimd is down); CloseIO drops it, and EOF then follows once the queued input is read.
                self._stdin_keeper = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                if not self.terminal:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    fds[0] = self._keep(r)
                    self._stdin_w = w
            elif kind == "file":
                fds[0] = self._keep(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            else:
                raise ValueError(f"stdin {stdin!r}: only a FIFO or a file can be stdin")
        if self.terminal:
            # runc hands the pty to the container; stdout/stderr of runc itself go nowhere.
            null_out = self._keep(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
            self.stdio = (fds[0], null_out, null_out)
            return
        files: dict[str, int] = {}
        for i, (uri, stream) in enumerate(((stdout, b"stdout"), (stderr, b"stderr")), start=1):
            kind, path = output_target(uri)
            if kind == "null" and self.attach is None:
                fds[i] = self._keep(os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
            elif kind == "file":
                if path not in files:
                    files[path] = self._keep(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                                     0o640))
                fds[i] = files[path]
            else:
                r, w = os.pipe2(os.O_CLOEXEC)
                fds[i] = self._keep(w)
                self._pending_out.append((r, uri, stream))
        self.stdio = (fds[0], fds[1], fds[2])

    # -- copies, once the process exists ----------------------------------------------------------
    def start_copies(self, console: int = -1) -> None:
        """Close the child's ends (runc has passed them on) and start copying."""
        for fd in set(self.child_fds):
            os.close(fd)
        self.child_fds.clear()
        if self.terminal and console >= 0:
            self._pending_out = [(console, self.uris[1], b"stdout")]
            self.console = console
        for fd, uri, stream in self._pending_out:
            self._start_out(fd, uri, stream, owns_fd=not (self.terminal and fd == console))
        self._pending_out = []
        if self._stdin_fifo >= 0:
            target = console if self.terminal else self._stdin_w
            pump_ref: list[Pump] = []
            sink = FdSink(os.dup(target) if self.terminal else target, lambda: pump_ref and pump_ref[0].resume())
            self.stdin_sink = sink
            pump = Pump(self._stdin_fifo, sink.write, sink.finish)
            pump_ref.append(pump)
            self.stdin_pump = pump
            self._stdin_fifo = -1

    def _teed(self, stream: bytes, sink: Callable[[bytes], bool]) -> Callable[[bytes], bool]:
        """sink, and the attached clients first (they are never waited for)."""
        fanout = self.attach
        if fanout is None:
            return sink
        code = ATTACH_STDOUT if stream == b"stdout" else ATTACH_STDERR

        def both(data: bytes) -> bool:
            fanout.send(code, data)
            return sink(data)

        return both

    def _start_out(self, fd: int, uri: str, stream: bytes, owns_fd: bool) -> None:
        kind, path = output_target(uri)
        if kind == "null":  # output nobody logs: keep reading so the process never blocks (and attach sees it)
            self.pumps.append(Pump(fd, self._teed(stream, lambda d: True), lambda: None, owns_fd))
            return
        if kind == "crilog":
            if self.cri is None:
                self.cri = CriLogSink(self.writer, path)
            cri = self.cri
            writer = self.writer
            ref: list[Pump] = []

            def to_cri(data: bytes) -> bool:
                if cri.feed(stream, data):
                    return True
                writer.when_drained(ref[0].resume)
                return False

            ref.append(Pump(fd, self._teed(stream, to_cri), lambda: cri.flush(stream), owns_fd))
            self.pumps.append(ref[0])
            return
        if kind == "file":
            # A terminal's output with a file:// destination: the writer thread appends it.
            writer, fref = self.writer, []

            def to_file(data: bytes) -> bool:
                if writer.append(path, data):
                    return True
                writer.when_drained(fref[0].resume)
                return False

            fref.append(Pump(fd, self._teed(stream, to_file), lambda: None, owns_fd))
            self.pumps.append(fref[0])
            return
        # A FIFO: opened read-write so the open never blocks and a missing reader never raises EPIPE.
        out_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        pump_ref: list[Pump] = []
        sink = FdSink(out_fd, lambda: pump_ref and pump_ref[0].resume())
        self.sinks.append(sink)
        pump = Pump(fd, self._teed(stream, sink.write), sink.finish, owns_fd)
        pump_ref.append(pump)
        self.pumps.append(pump)

    async def drain(self, timeout: float) -> None:
        """Wait for the output copies to reach EOF (all writers gone), then stop them regardless."""
        pending = [p.done for p in self.pumps if not p.done.done()]
        if pending:
            await aio.wait(pending, timeout=timeout)
        for p in self.pumps:
            p.stop()
        if self.attach is not None:
            self.attach.finish()

    def close_stdin(self) -> None:
        """CloseIO: no more input is coming. Input already queued in the FIFO still reaches the process."""
        if self._stdin_keeper >= 0:
            os.close(self._stdin_keeper)
            self._stdin_keeper = -1
        if self.stdin_pump is not None:
            self.stdin_pump.drain_now()
        self._stop_stdin()

    def _stop_stdin(self) -> None:
        if self.stdin_pump is not None:
            self.stdin_pump.stop()
        elif self.stdin_sink is not None:
            self.stdin_sink.close()
        if self._stdin_fifo >= 0:
            os.close(self._stdin_fifo)
            self._stdin_fifo = -1

    def log_paths(self) -> list[str]:
        """The CRI log files this process writes (one at most, whatever the streams)."""
        uris = self.uris[1:2] if self.terminal else self.uris[1:]
        return sorted({path for kind, path in map(output_target, uris) if kind == "crilog"})

    async def open_logs(self, timeout: float) -> None:
        """Create the CRI log file before the process runs: readers open it as soon as the start returns,
        even when nothing has been written yet."""
        for path in self.log_paths():
            try:
                async with aio.timeout(timeout):
                    await self.writer.open(path)
            except TimeoutError:
                raise TimeoutError(f"log file {path} was not created within {timeout:g}s") from None

    async def reopen_log(self, timeout: float) -> None:
        if self.cri is not None:
            await self.cri.reopen(timeout)

    def close(self) -> None:
        if self._stdin_keeper >= 0:
            os.close(self._stdin_keeper)
            self._stdin_keeper = -1
        self._stop_stdin()
        for p in self.pumps:
            p.stop()
        for s in self.sinks:
            s.close()
        for fd in set(self.child_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.child_fds.clear()
        for fd, _, _ in self._pending_out:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pending_out = []
        if self._stdin_w >= 0 and self.stdin_sink is None:
            os.close(self._stdin_w)
            self._stdin_w = -1
        if self.console >= 0:
            with contextlib.suppress(OSError):
                os.close(self.console)
            self.console = -1
        for path in self.log_paths():  # opened by open_logs even if the process never ran
            self.writer.close(path)
        if self.attach is not None:
            self.attach.close()
