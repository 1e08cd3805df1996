"""CRI log writer for containerd's `binary://` logging protocol (shim v2 binaries that know no crilog://).

The shim starts this program with the container's stdout on fd 3, stderr on fd 4 and a readiness
pipe on fd 5 (closed once we are ready), env CONTAINER_ID and CONTAINER_NAMESPACE. Arguments come
from the URI's query: `binary:///path/to/shimd-crilogger?log=/var/log/pods/.../0.log` gives
`log <path>`. Output is written in the CRI format until both streams reach EOF, independently of
shimd (which may be down meanwhile).

The log file is reopened on SIGHUP, and also when it was renamed or removed (checked at most once a
second), so kubelet's rotation works without any call reaching this process.

A plain selector loop: this process does one thing, and an event loop would only cost memory.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time

STDOUT_FD, STDERR_FD, READY_FD = 3, 4, 5
CHUNK = 32 * 1024
# Longer lines are split into partial (P) records, as containerd and the runc shim's writer do.
CRI_LINE_MAX = 16 * 1024
STAT_INTERVAL = 1.0
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def _timestamp(ns: int) -> bytes:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
            + f".{ns % 1_000_000_000:09d}Z").encode()


class CriLines:
    """`<RFC3339Nano UTC> <stream> <F|P> <content>` records of one stream.

    Deliberately not shims.common.stdio.CriLogSink: importing that module (and asyncio with it)
    doubles this long-lived process's memory, and there is one per container.
    """

    def __init__(self, stream: bytes) -> None:
        self.stream = stream
        self.partial = bytearray()

    def _emit(self, out: list[bytes], ts: bytes, line: bytes) -> None:
        while len(line) > CRI_LINE_MAX:
            out.append(b"%s %s P %s\n" % (ts, self.stream, line[:CRI_LINE_MAX]))
            line = line[CRI_LINE_MAX:]
        out.append(b"%s %s F %s\n" % (ts, self.stream, line))

    def feed(self, data: bytes) -> bytes:
        buf = self.partial
        buf += data
        out: list[bytes] = []
        ts = _timestamp(time.time_ns())
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            self._emit(out, ts, bytes(buf[start:nl]))
            start = nl + 1
        del buf[:start]
        while len(buf) > CRI_LINE_MAX:
            out.append(b"%s %s P %s\n" % (ts, self.stream, bytes(buf[:CRI_LINE_MAX])))
            del buf[:CRI_LINE_MAX]
        return b"".join(out)

    def flush(self) -> bytes:
        """At EOF an unterminated last line is complete."""
        if not self.partial:
            return b""
        out: list[bytes] = []
        self._emit(out, _timestamp(time.time_ns()), bytes(self.partial))
        self.partial.clear()
        return b"".join(out)


class LogFile:
    """The log file, written synchronously; reopened after a rename (rotation) or on request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.ino = (0, 0)
        self.checked = 0.0
        self.reopen_requested = False
        self.failed = False

    def _open(self) -> None:
        self.fd = os.open(self.path, _FLAGS, 0o640)
        st = os.fstat(self.fd)
        self.ino = (st.st_dev, st.st_ino)
        self.checked = time.monotonic()

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _rotated(self) -> bool:
        now = time.monotonic()
        if now - self.checked < STAT_INTERVAL:
            return False
        self.checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.ino

    def append(self, data: bytes) -> None:
        if not data:
            return
        try:
            if self.reopen_requested or (self.fd >= 0 and self._rotated()):
                self.reopen_requested = False
                self._close()
            if self.fd < 0:
                self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self.failed = False
        except OSError as e:
            # A full disk or a removed log directory must not stop the container: drop, report once.
            self._close()
            if not self.failed:
                sys.stderr.write(f"shimd-crilogger: writing {self.path}: {e}\n")
            self.failed = True

    def reopen(self) -> None:
        self.reopen_requested = True


def _arg(argv: list[str], name: str) -> str:
    for i in range(0, len(argv) - 1):
        if argv[i] == name:
            return argv[i + 1]
    return ""


def main(argv: list[str]) -> int:
    path = _arg(argv, "log")
    if not path or not os.path.isabs(path):
        sys.stderr.write(f"usage: shimd-crilogger log /absolute/path (got {argv!r})\n")
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    out = LogFile(path)
    signal.signal(signal.SIGHUP, lambda *_: out.reopen())
    # Terminating signals are ignored: the logger ends when the container's output ends, never earlier.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    streams = {STDOUT_FD: CriLines(b"stdout"), STDERR_FD: CriLines(b"stderr")}
    sel = selectors.DefaultSelector()
    for fd in list(streams):
        try:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            streams.pop(fd)
    try:
        os.close(READY_FD)
    except OSError:
        pass
    while streams:
        for key, _ in sel.select():
            fd = int(key.fd)
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                continue
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if data:
                out.append(streams[fd].feed(data))
                continue
            out.append(streams[fd].flush())
            sel.unregister(fd)
            os.close(fd)
            del streams[fd]
    out._close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
