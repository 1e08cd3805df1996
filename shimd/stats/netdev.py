"""Interface counters of a pod's network namespace, read from /proc/<tid>/net/dev inside it.

setns(2) moves only the calling thread, so a dedicated short-lived thread enters the namespace,
reads its own /proc/thread-self/net/dev and exits; it never serves anything else afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Interface:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int
    rx_packets: int = 0
    rx_dropped: int = 0
    tx_packets: int = 0
    tx_dropped: int = 0


def parse(text: str) -> list[Interface]:
    """/proc/net/dev: two header lines, then `name: rx(bytes packets errs drop ...) tx(bytes packets errs drop ...)`."""
    out = []
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) < 16:
            continue
        out.append(Interface(name.strip(), int(f[0]), int(f[2]), int(f[8]), int(f[10]),
                             rx_packets=int(f[1]), rx_dropped=int(f[3]), tx_packets=int(f[9]), tx_dropped=int(f[11])))
    return out


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _read_in(netns_path: str) -> str:
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
    finally:
        os.close(target)
    with open("/proc/thread-self/net/dev") as f:
        return f.read()


async def read_netns(netns_path: str, timeout: float = 5.0) -> list[Interface]:
    """Counters of every interface in the namespace pinned at netns_path (loopback excluded)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def deliver(text: str | None, exc: BaseException | None) -> None:
        if fut.done():
            return  # the caller timed out
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(text or "")

    def work() -> None:
        try:
            text = _read_in(netns_path)
        except BaseException as e:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(deliver, None, e)
            return
        loop.call_soon_threadsafe(deliver, text, None)

    # Not pooled: the thread ends inside the pod's namespace and must not be reused.
    threading.Thread(target=work, name="netdev-reader", daemon=True).start()
    text = await asyncio.wait_for(fut, timeout)
    return [i for i in parse(text) if i.name != "lo"]


async def read_pid(pid: int) -> list[Interface]:
    """Counters as seen by a process already in the namespace (no thread needed)."""
    text = await asyncio.to_thread(_read_file, f"/proc/{pid}/net/dev")
    return [i for i in parse(text) if i.name != "lo"]


def _read_file(path: str) -> str:
    with open(path) as f:
        return f.read()
