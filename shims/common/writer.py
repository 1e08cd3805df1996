"""One background thread that does every file append of a shim (CRI logs, shim log).

Why a single thread rather than aiofiles: aiofiles hands each write to a thread pool (several
threads, each with its own stack and malloc arena, plus the pool machinery); one thread with a
SimpleQueue is the smallest resident cost and still keeps blocking writes off the event loop.
Files stay open between writes and are keyed by path. `open` creates a file before anything is
written to it (readers such as kubelet open a container's log at once), and with `fresh` closes the
old descriptor first (log rotation: the client renamed the file); queued data keeps its order, so
what was queued before lands in the old file and nothing is lost.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from shims.common import aio

_STOP = object()
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# Queued bytes above which producers are asked to pause (a slow disk must not grow the shim's memory),
# and below which they are resumed.
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10


class _Open:
    """A queued request to open a file now; `done` is resolved on the event loop once it is open."""

    __slots__ = ("done", "fresh", "loop")

    def __init__(self, loop: aio.Loop, fresh: bool) -> None:
        self.loop, self.fresh = loop, fresh
        self.done: aio.Future[None] = loop.create_future()

    def finish(self, error: OSError | None) -> None:
        self.loop.call_soon_threadsafe(self._resolve, error)

    def _resolve(self, error: OSError | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


class FileWriter:
    def __init__(self, on_error: Callable[[str, OSError], None] | None = None) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._fds: dict[str, int] = {}
        self._on_error = on_error
        self._lock = threading.Lock()
        self._queued = 0
        self._paused: list[Callable[[], None]] = []
        self._loop: aio.Loop | None = None
        self._thread = threading.Thread(target=self._run, name="file-writer", daemon=True)
        self._thread.start()

    def append(self, path: str, data: bytes) -> bool:
        """Queue data; False means the queue is over HIGH_WATER and the producer should pause."""
        with self._lock:
            self._queued += len(data)
            over = self._queued > HIGH_WATER
        self._q.put((path, data))
        return not over

    def when_drained(self, resume: Callable[[], None]) -> None:
        """Call resume (on the event loop) once the queue is back under LOW_WATER."""
        if self._loop is None:
            self._loop = aio.get_running_loop()
        with self._lock:
            if self._queued > LOW_WATER:
                self._paused.append(resume)
                return
        self._loop.call_soon(resume)  # never synchronously: the producer has not paused yet

    def open(self, path: str, fresh: bool = False) -> aio.Future[None]:
        """Create the file (if missing) and keep it open; fresh: close the current descriptor first, so a
        renamed file is left behind. The future fails with the OSError of the open."""
        req = _Open(aio.get_running_loop(), fresh)
        self._q.put((path, req))
        return req.done

    def close(self, path: str) -> None:
        self._q.put((path, None))

    def stop(self, timeout: float = 5.0) -> None:
        """Flush what is queued and stop the thread (called from synchronous shutdown paths)."""
        self._q.put(_STOP)
        self._thread.join(timeout)

    def set_error_handler(self, on_error: Callable[[str, OSError], None]) -> None:
        self._on_error = on_error

    def _run(self) -> None:
        failed: set[str] = set()
        while True:
            item = self._q.get()
            if item is _STOP:
                break
            path, data = item  # type: ignore[misc]
            if data is None or isinstance(data, _Open):
                if data is None or data.fresh:
                    fd = self._fds.pop(path, None)
                    if fd is not None:
                        os.close(fd)
                if data is not None:
                    try:
                        if path not in self._fds:
                            self._fds[path] = os.open(path, _FLAGS, 0o640)
                        failed.discard(path)
                        data.finish(None)
                    except OSError as e:
                        data.finish(e)
                continue
            try:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, _FLAGS, 0o640)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                failed.discard(path)
            except OSError as e:
                # A full disk or a vanished directory must not take the shim down: drop the data, and
                # report the first failure of a run (the report itself goes to shim.log, so not for that).
                bad = self._fds.pop(path, None)
                if bad is not None:
                    os.close(bad)
                if self._on_error is not None and path not in failed and not path.endswith("shim.log"):
                    self._on_error(path, e)
                failed.add(path)
            with self._lock:
                self._queued -= len(data)
                wake = self._paused if self._queued <= LOW_WATER and self._paused else None
                if wake:
                    self._paused = []
            if wake and self._loop is not None:
                for resume in wake:
                    self._loop.call_soon_threadsafe(resume)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
