"""Lets a layer be unpacked while it is still downloading.

The download appends to its ingest file and reports each flushed chunk here; the unpack thread
reads the same file through FollowReader, blocking at the current end until more arrives. The
data path is the page cache, so nothing extra is held in memory. The unpacked snapshot is only
committed once the download has verified the digest, so reading unverified bytes early is safe.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import IO

STALL_SECONDS = 300.0


class DownloadAborted(Exception):
    """The download this reader follows failed or restarted."""


class Progress:
    def __init__(self, path: Path, final: Path) -> None:
        self.path = path          # the ingest file being written
        self.final = final        # where it is renamed once verified
        self._cond = threading.Condition()
        self.written = 0
        self.done = False
        self.failed = ""

    def advance(self, n: int) -> None:
        with self._cond:
            self.written += n
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def complete_existing(self, size: int) -> None:
        """The blob was already in the store: readers take it from there."""
        with self._cond:
            self.path, self.written, self.done = self.final, size, True
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        with self._cond:
            if not self.done:
                self.failed = why or "download failed"
            self._cond.notify_all()

    def wait_beyond(self, pos: int) -> int:
        """Block until more than `pos` bytes are available; returns what is available (pos at EOF)."""
        deadline = time.monotonic() + STALL_SECONDS
        with self._cond:
            while True:
                if self.failed:
                    raise DownloadAborted(self.failed)
                if self.written > pos or self.done:
                    return self.written
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DownloadAborted(f"no data for {STALL_SECONDS:.0f}s")
                self._cond.wait(timeout=min(left, 1.0))


class FollowReader:
    """File-like read() over a file that another party is still appending to."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.pos = 0
        self._f: IO[bytes] | None = None

    def read(self, n: int = -1) -> bytes:
        avail = self.progress.wait_beyond(self.pos)
        if avail <= self.pos:
            return b""
        if self._f is None:
            try:
                self._f = open(self.progress.path, "rb")  # closed in close()
            except FileNotFoundError:
                self._f = open(self.progress.final, "rb")  # verified and renamed meanwhile
        want = avail - self.pos if n < 0 else min(n, avail - self.pos)
        data = self._f.read(want)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> FollowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
