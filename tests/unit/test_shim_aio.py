"""The shim's own event loop (shims/common/aio.py): asyncio's semantics for what the shim uses."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from shims.common import aio


def test_timeout_raises_timeout_error_and_runs_the_body_cleanup() -> None:
    cleaned: list[str] = []

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with aio.timeout(0.05):
                try:
                    await aio.sleep(5)
                finally:
                    cleaned.append("body")
        # The timeout is spent: later waits in the same task are not cancelled.
        await aio.sleep(0.01)
        cleaned.append("after")

    started = time.monotonic()
    aio.run(main())
    assert cleaned == ["body", "after"]
    assert time.monotonic() - started < 2


def test_a_timeout_left_early_never_cancels_later_awaits() -> None:
    async def main() -> str:
        async with aio.timeout(0.0):
            pass  # left before its timer is due: the timer must be disarmed, not fire into later awaits
        await aio.sleep(0.01)
        return "ok"

    assert aio.run(main()) == "ok"


def test_cancel_propagates_into_the_awaited_task() -> None:
    seen: list[str] = []

    async def inner() -> None:
        try:
            await aio.sleep(5)
        except aio.CancelledError:
            seen.append("inner cancelled")
            raise

    async def main() -> None:
        t = aio.ensure_future(inner())
        outer = aio.ensure_future(aio.wait_for(t, None))
        await aio.sleep(0.01)
        outer.cancel()
        with pytest.raises(aio.CancelledError):
            await outer
        assert t.cancelled()

    aio.run(main())
    assert seen == ["inner cancelled"]


def test_gather_wait_event_and_lock() -> None:
    order: list[int] = []

    async def worker(lock: aio.Lock, n: int) -> int:
        async with lock:
            order.append(n)
            await aio.sleep(0.005)
            order.append(n)
        return n * 2

    async def main() -> None:
        lock = aio.Lock()
        assert await aio.gather(*(worker(lock, n) for n in range(4))) == [0, 2, 4, 6]
        assert order == [0, 0, 1, 1, 2, 2, 3, 3]  # never interleaved, first come first served
        ev = aio.Event()
        waiter = aio.ensure_future(ev.wait())
        done, pending = await aio.wait([waiter], timeout=0.02)
        assert not done and pending == {waiter}
        ev.set()
        done, pending = await aio.wait([waiter], timeout=1)
        assert done == {waiter} and not pending

    aio.run(main())


def test_gather_reports_the_first_failure() -> None:
    async def bad() -> None:
        raise ValueError("bad")

    async def main() -> None:
        with pytest.raises(ValueError, match="bad"):
            await aio.gather(aio.sleep(0.01), bad())

    aio.run(main())


def test_to_thread_and_call_soon_threadsafe() -> None:
    async def main() -> None:
        assert await aio.to_thread(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError):
            await aio.to_thread({}.__getitem__, "missing")
        loop = aio.get_running_loop()
        fut = loop.create_future()
        threading.Thread(target=lambda: (time.sleep(0.02), loop.call_soon_threadsafe(fut.set_result, "woken"))).start()
        async with aio.timeout(5):
            assert await fut == "woken"

    aio.run(main())


def test_signal_handler_runs_on_the_loop() -> None:
    async def main() -> None:
        loop = aio.get_running_loop()
        got = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, lambda: got.done() or got.set_result("usr1"))
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            async with aio.timeout(5):
                assert await got == "usr1"
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    aio.run(main())
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    # The process's wake-up descriptor is given back: the next event loop (asyncio's here) sets its own.
    assert signal.set_wakeup_fd(-1) == -1


def test_unix_server_connection_reads_exactly_and_writes_back(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    async def serve(conn: aio.Connection) -> None:
        try:
            while True:
                n = int.from_bytes(await conn.readexactly(4), "big")
                body = await conn.readexactly(n)
                conn.write(body[::-1] * 1000)  # larger than the socket buffer: the backlog drains
                await conn.drain()
        except aio.IncompleteReadError as e:
            assert e.partial == b""  # the peer closed between messages
        finally:
            conn.close()

    def client() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(len(b"abc").to_bytes(4, "big"))
            time.sleep(0.02)  # the body arrives in a second segment
            s.sendall(b"abc")
            want, got = 3000, b""
            while len(got) < want:
                got += s.recv(65536)
            return got

    async def main() -> bytes:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(4)
        server = aio.UnixServer(listener, serve)
        try:
            async with aio.timeout(10):
                return await aio.to_thread(client)  # type: ignore[return-value]
        finally:
            server.close()

    assert aio.run(main()) == b"cba" * 1000


def test_to_thread_reuses_waiting_threads_and_never_queues_behind_a_slow_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls in a row run on one thread; a call made while another blocks gets a thread of its own at once;
    a thread with nothing to do for WORKER_IDLE ends."""
    monkeypatch.setattr(aio, "WORKER_IDLE", 0.3)

    def worker_threads() -> set[int]:
        return {t.ident for t in threading.enumerate() if t.name == "to-thread" and t.ident is not None}

    async def main() -> None:
        before = worker_threads()
        idents = {await aio.to_thread(threading.get_ident) for _ in range(20)}
        assert len(idents - before) <= 1  # threads left waiting by earlier calls may take some
        await aio.sleep(0.1)
        assert idents <= worker_threads()  # still there, waiting for the next call
        release = threading.Event()
        slow = aio.ensure_future(aio.to_thread(release.wait, 5))
        await aio.sleep(0.02)
        async with aio.timeout(1):  # not behind the slow call
            quick = await aio.to_thread(threading.get_ident)
        assert quick != 0
        release.set()
        assert await slow is True
        assert len(worker_threads() - before) <= 2
        deadline = time.monotonic() + 5
        while worker_threads() - before:
            assert time.monotonic() < deadline, "idle worker threads did not end"
            await aio.sleep(0.05)
        # and a later call starts one again
        assert await aio.to_thread(lambda: 7) == 7

    aio.run(main())
