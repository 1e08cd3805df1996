"""Claiming the CRI unix socket: one owner at a time, stale sockets replaced safely."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path

from shimd.errors import FailedPrecondition


class SocketGuard:
    """Holds an flock next to the socket for the daemon's lifetime.

    The lock, not a connect probe, decides ownership: a socket file left by a killed shimd is
    stale exactly when nobody holds the lock, and then it is safe to unlink.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None

    def claim(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Traverse only (0711, not 0700): this is usually daemon.state, which the mapped root of a pod with a
        # user namespace must pass through to its rootfs. Connecting needs write access to the socket (0660).
        os.chmod(self.path.parent, 0o711)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FailedPrecondition(f"another shimd owns {self.path} (lock {self.lock_path} is held)") from None
            raise
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_socket():
                self.release()
                raise FailedPrecondition(f"{self.path} exists and is not a socket; refusing to replace it")
            if _answers(self.path):
                # A process not using our lock (an older shimd?) still serves here.
                self.release()
                raise FailedPrecondition(f"{self.path} is in use by another process")
            self.path.unlink()

    def bind(self, backlog: int = 128) -> socket.socket:
        """A listening socket at the path that is never, not for an instant, open to anyone but root and the
        socket's group: bound in a private (0700) directory beside the path, made 0660 there, then renamed
        into place. chmod after binding at the path would leave a window with the umask's mode."""
        private = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(str(private / "s"))
                os.chmod(private / "s", 0o660)
                sock.listen(backlog)
                os.replace(private / "s", self.path)
            except BaseException:
                sock.close()
                raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(private / "s")
            os.rmdir(private)
        return sock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
