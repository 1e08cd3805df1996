"""TCP connections into a pod's network namespace without moving the event loop's thread.

setns(2) changes the namespace of the calling thread only, so a short-lived worker thread enters
the target namespace, creates the socket there and connects it (a socket stays bound to the
namespace it was created in), and the connected socket is handed to asyncio. The worker thread
exits right after; it never returns to the pool in the wrong namespace because it is not pooled.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

from shimd.errors import DeadlineExceeded, NotFound, Unavailable

CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns arrives only in Python 3.12.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _connect_in(netns_path: str, host: str, port: int, timeout: float) -> socket.socket:
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        os.close(own)
        raise NotFound(f"network namespace {netns_path} does not exist") from None
    try:
        _setns(target)
        sock = None
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        finally:
            try:
                _setns(own)  # the socket keeps the target namespace; the thread goes back
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.setblocking(False)
            return sock
        except BaseException:
            sock.close()
            raise
    finally:
        os.close(target)
        os.close(own)


async def dial_in_netns(netns_path: str, host: str, port: int,
                        timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to host:port as seen from inside netns_path (a /proc/PID/ns/net or a bind-mounted pin)."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[socket.socket] = loop.create_future()

    def work() -> None:
        try:
            sock = _connect_in(netns_path, host, port, timeout)
        except BaseException as e:  # delivered to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, result, None, e)
        else:
            loop.call_soon_threadsafe(_settle, result, sock, None)

    # A dedicated thread, not asyncio.to_thread: a pooled thread left in the pod's namespace by a
    # failed setns back would poison later, unrelated work.
    threading.Thread(target=work, name=f"netns-dial-{port}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout + 1.0):
            sock = await asyncio.shield(result)
    except TimeoutError:
        result.add_done_callback(_close_late)
        raise DeadlineExceeded(f"connecting to {host}:{port} in {netns_path} timed out after {timeout}s") from None
    except asyncio.CancelledError:
        result.add_done_callback(_close_late)
        raise
    except ConnectionRefusedError:
        raise Unavailable(f"connection to {host}:{port} refused in {netns_path}") from None
    except OSError as e:
        raise Unavailable(f"connecting to {host}:{port} in {netns_path}: {e.strerror or e}") from None
    return await asyncio.open_connection(sock=sock)


def _settle(fut: asyncio.Future[socket.socket], sock: socket.socket | None, exc: BaseException | None) -> None:
    if fut.done():
        if sock is not None:
            sock.close()
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert sock is not None
        fut.set_result(sock)


def _close_late(fut: asyncio.Future[socket.socket]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()
