"""The shim's event loop: the part of asyncio a shim uses, on one epoll descriptor.

Why not asyncio: every shim is one more resident process per pod, and importing asyncio (with
concurrent.futures, logging, inspect, typing and what they pull in) costs each shim about 4 MiB of
memory that a fork cannot share once written. This module keeps asyncio's names and semantics for
what the shim needs (futures, tasks with cancellation, timeouts, events, locks, readers and writers
on descriptors, signals, timers, work in a thread, a unix stream server) so shim code reads the same.

Signals and wake-ups from other threads share one pipe: signal.set_wakeup_fd writes the signal
number, call_soon_threadsafe writes a zero byte.
"""

from __future__ import annotations

import heapq
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from queue import Empty, SimpleQueue
from types import GenericAlias

Callback = Callable[..., object]


class CancelledError(BaseException):
    pass


class IncompleteReadError(EOFError):
    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"{len(partial)} bytes read of {expected} expected")
        self.partial, self.expected = partial, expected


class InvalidStateError(Exception):
    pass


_loop: Loop | None = None
_current: Task | None = None


def get_running_loop() -> Loop:
    if _loop is None:
        raise RuntimeError("no running shim event loop")
    return _loop


def current_task() -> Task | None:
    return _current


class Handle:
    __slots__ = ("args", "cancelled", "fn")

    def __init__(self, fn: Callback, args: tuple[object, ...]) -> None:
        self.fn, self.args, self.cancelled = fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class Future:
    _PENDING, _DONE, _CANCELLED = 0, 1, 2
    __class_getitem__ = classmethod(GenericAlias)  # Future[T] in annotations, without importing typing

    def __init__(self) -> None:
        self._state = Future._PENDING
        self._result: object = None
        self._exc: BaseException | None = None
        self._retrieved = False
        self._callbacks: list[Callback] = []

    def done(self) -> bool:
        return self._state != Future._PENDING

    def cancelled(self) -> bool:
        return self._state == Future._CANCELLED

    def result(self) -> object:
        if self._state == Future._CANCELLED:
            raise CancelledError()
        if self._state == Future._PENDING:
            raise InvalidStateError("result is not ready")
        self._retrieved = True
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self) -> BaseException | None:
        if self._state == Future._CANCELLED:
            raise CancelledError()
        self._retrieved = True
        return self._exc

    def set_result(self, value: object) -> None:
        if self._state != Future._PENDING:
            raise InvalidStateError("future already done")
        self._result, self._state = value, Future._DONE
        self._schedule_callbacks()

    def set_exception(self, exc: BaseException) -> None:
        if self._state != Future._PENDING:
            raise InvalidStateError("future already done")
        self._exc, self._state = exc, Future._DONE
        self._schedule_callbacks()

    def cancel(self) -> bool:
        if self._state != Future._PENDING:
            return False
        self._state = Future._CANCELLED
        self._schedule_callbacks()
        return True

    def add_done_callback(self, fn: Callback) -> None:
        if self.done():
            get_running_loop().call_soon(fn, self)
        else:
            self._callbacks.append(fn)

    def remove_done_callback(self, fn: Callback) -> None:
        self._callbacks = [cb for cb in self._callbacks if cb != fn]

    def _schedule_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        loop = get_running_loop()
        for cb in callbacks:
            loop.call_soon(cb, self)

    def __await__(self) -> Generator[Future, None, object]:
        if not self.done():
            yield self
        return self.result()


class Task(Future):
    """Runs a coroutine; cancel() throws CancelledError into it at the point it waits (and cancels what
    it waits on, as asyncio does)."""

    def __init__(self, coro: Coroutine[object, object, object]) -> None:
        super().__init__()
        self._coro = coro
        self._waiting: Future | None = None
        self._must_cancel = False
        get_running_loop().call_soon(self._step)

    def cancel(self) -> bool:
        if self.done():
            return False
        if self._waiting is not None and self._waiting.cancel():
            return True
        self._must_cancel = True
        return True

    def _step(self, exc: BaseException | None = None) -> None:
        global _current
        if self.done():
            return
        if self._must_cancel:
            self._must_cancel = False
            exc = CancelledError()
        self._waiting = None
        prev, _current = _current, self
        try:
            yielded = self._coro.send(None) if exc is None else self._coro.throw(exc)
        except StopIteration as stop:
            super().set_result(stop.value)
        except CancelledError:
            super().cancel()
        except BaseException as e:
            super().set_exception(e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if isinstance(yielded, Future):
                self._waiting = yielded
                yielded.add_done_callback(self._wakeup)
                if self._must_cancel and yielded.cancel():
                    self._must_cancel = False
            else:  # a bare yield (sleep(0)): run again on the next turn
                get_running_loop().call_soon(self._step)
        finally:
            _current = prev

    def __del__(self) -> None:
        if self._exc is not None and not self._retrieved:  # as asyncio does: a failure nobody awaited is logged
            _report(f"shim task {getattr(self._coro, '__qualname__', self._coro)} failed and nobody awaited it: "
                    f"{type(self._exc).__name__}: {self._exc}")

    def _wakeup(self, fut: Future) -> None:
        try:
            fut.result()
        except BaseException as e:
            self._step(e)
        else:
            self._step()


def ensure_future(aw: Awaitable[object]) -> Future:
    if isinstance(aw, Future):
        return aw
    return Task(aw)  # type: ignore[arg-type]



class Loop:
    def __init__(self) -> None:
        self._ready: deque[Handle] = deque()
        self._timers: list[tuple[float, int, Handle]] = []
        self._seq = 0
        self._epoll = select.epoll()
        self._readers: dict[int, Handle] = {}
        self._writers: dict[int, Handle] = {}
        self._signals: dict[int, Handle] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread_ready: deque[Handle] = deque()
        self._registered: set[int] = set()
        self.add_reader(self._wake_r, self._on_wake)
        self._old_wakeup_fd: int | None = None  # set_wakeup_fd's previous value (-1: none) once we set ours

    # -- scheduling -------------------------------------------------------------------------------
    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, fn: Callback, *args: object) -> Handle:
        h = Handle(fn, args)
        self._ready.append(h)
        return h

    def call_later(self, delay: float, fn: Callback, *args: object) -> Handle:
        h = Handle(fn, args)
        self._seq += 1
        heapq.heappush(self._timers, (self.time() + max(delay, 0.0), self._seq, h))
        return h

    def call_soon_threadsafe(self, fn: Callback, *args: object) -> Handle:
        h = Handle(fn, args)
        self._thread_ready.append(h)  # deque.append is atomic
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is going to wake anyway
        return h

    def create_future(self) -> Future:
        return Future()

    # -- descriptors --------------------------------------------------------------------------------
    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (select.EPOLLOUT if fd in self._writers else 0)
        if not mask:
            if fd in self._registered:
                self._registered.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # already closed: the kernel dropped it from the set
            return
        if fd in self._registered:
            try:
                self._epoll.modify(fd, mask)
                return
            except FileNotFoundError:
                pass  # closed and the number reused since: register afresh
        try:
            self._epoll.register(fd, mask)
        except FileExistsError:
            self._epoll.modify(fd, mask)
        self._registered.add(fd)

    def add_reader(self, fd: int, fn: Callback, *args: object) -> None:
        self._readers[fd] = Handle(fn, args)
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        if self._readers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    def add_writer(self, fd: int, fn: Callback, *args: object) -> None:
        self._writers[fd] = Handle(fn, args)
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        if self._writers.pop(fd, None) is None:
            return False
        self._update(fd)
        return True

    # -- signals ----------------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, fn: Callback, *args: object) -> None:
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._signals[signum] = Handle(fn, args)
        signal.signal(signum, _no_op_handler)  # the C-level handler writes signum to the wake-up pipe
        signal.siginterrupt(signum, False)

    def remove_signal_handler(self, signum: int) -> bool:
        if self._signals.pop(signum, None) is None:
            return False
        signal.signal(signum, signal.SIG_DFL)
        return True

    def _on_wake(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            data = b""
        for signum in set(data):
            h = self._signals.get(signum)
            if h is not None:
                self._ready.append(h)
        while self._thread_ready:
            self._ready.append(self._thread_ready.popleft())

    # -- running ------------------------------------------------------------------------------------
    def _run_once(self) -> None:
        timeout = -1.0
        if self._ready or self._thread_ready:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - self.time())
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, mask in events:
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                h = self._readers.get(fd)
                if h is not None:
                    self._ready.append(h)
            if mask & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR):
                h = self._writers.get(fd)
                if h is not None:
                    self._ready.append(h)
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            self._ready.append(heapq.heappop(self._timers)[2])
        for _ in range(len(self._ready)):
            h = self._ready.popleft()
            if h.cancelled:
                continue
            try:
                h.fn(*h.args)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:
                _report(f"shim event loop: callback {getattr(h.fn, '__qualname__', h.fn)} failed: "
                        f"{type(e).__name__}: {e}")

    def run_until_complete(self, fut: Future) -> object:
        while not fut.done():
            self._run_once()
        return fut.result()

    def close(self) -> None:
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
        for signum in list(self._signals):
            self.remove_signal_handler(signum)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _no_op_handler(signum: int, frame: object) -> None:
    pass


def _report(msg: str) -> None:
    try:
        os.write(2, msg.encode(errors="replace") + b"\n")
    except OSError:
        pass


def run(coro: Coroutine[object, object, object]) -> object:
    global _loop
    if _loop is not None:
        raise RuntimeError("a shim event loop is already running")
    loop = _loop = Loop()
    try:
        return loop.run_until_complete(Task(coro))
    finally:
        loop.close()
        _loop = None


# -- awaitables ----------------------------------------------------------------------------------------
class _YieldOnce:
    def __await__(self) -> Generator[None, None, None]:
        yield None


async def sleep(delay: float, result: object = None) -> object:
    if delay <= 0:
        await _YieldOnce()
        return result
    fut = Future()
    h = get_running_loop().call_later(delay, _set_if_pending, fut, result)
    try:
        return await fut
    finally:
        h.cancel()


def _set_if_pending(fut: Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


class timeout:
    """`async with timeout(s):` cancels the body after s seconds and raises TimeoutError instead."""

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._task: Task | None = None
        self._handle: Handle | None = None
        self._fired = False

    async def __aenter__(self) -> timeout:
        task = current_task()
        if task is None:
            raise RuntimeError("timeout() used outside a task")
        self._task = task
        if self._delay is not None:
            self._handle = get_running_loop().call_later(self._delay, self._fire)
        return self

    def _fire(self) -> None:
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired:
            if exc_type is CancelledError:
                raise TimeoutError() from None
            if self._task is not None:
                self._task._must_cancel = False  # fired as the body finished: the cancel is not for later
        return False


async def wait_for(aw: Awaitable[object], timeout_s: float | None) -> object:
    if timeout_s is None:
        return await aw
    async with timeout(timeout_s):
        return await aw


class _Gathering(Future):
    def __init__(self, children: list[Future]) -> None:
        super().__init__()
        self.children = children
        self._left = len(children)
        if not children:
            self.set_result([])
        for child in children:
            child.add_done_callback(self._child_done)

    def _child_done(self, child: Future) -> None:
        self._left -= 1
        if self.done():
            return
        if child.cancelled():
            super().cancel()
        elif child.exception() is not None:
            self.set_exception(child.exception())  # type: ignore[arg-type]
        elif self._left == 0:
            self.set_result([c.result() for c in self.children])

    def cancel(self) -> bool:
        if self.done():
            return False
        for child in self.children:
            child.cancel()
        return super().cancel()


def gather(*aws: Awaitable[object]) -> Future:
    return _Gathering([ensure_future(aw) for aw in aws])


async def wait(futs: Iterable[Future], timeout: float | None = None) -> tuple[set[Future], set[Future]]:
    """Wait until all are done or the timeout passes (nothing is cancelled); (done, pending)."""
    futs = set(futs)
    pending = {f for f in futs if not f.done()}
    if pending:
        waiter = Future()

        def one_done(_f: Future) -> None:
            if not waiter.done() and all(f.done() for f in pending):
                waiter.set_result(None)

        for f in pending:
            f.add_done_callback(one_done)
        h = get_running_loop().call_later(timeout, _set_if_pending, waiter, None) if timeout is not None else None
        try:
            await waiter
        finally:
            if h is not None:
                h.cancel()
            for f in pending:
                f.remove_done_callback(one_done)
    return {f for f in futs if f.done()}, {f for f in futs if not f.done()}


class Event:
    def __init__(self) -> None:
        self._set = False
        self._waiters: list[Future] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(True)

    async def wait(self) -> bool:
        if self._set:
            return True
        fut = Future()
        self._waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return True


class Lock:
    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[Future] = deque()

    async def acquire(self) -> bool:
        if not self._locked and not self._waiters:
            self._locked = True
            return True
        fut = Future()
        self._waiters.append(fut)
        try:
            await fut
        except CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake_next_after_handoff()  # we were handed the lock but will not take it
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        self._locked = True
        return True

    def _wake_next_after_handoff(self) -> None:
        self._locked = False
        self._wake_next()

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("Lock is not acquired")
        self._locked = False
        self._wake_next()

    def _wake_next(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(True)
                return

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


# A worker thread waits this long for more work before it ends: a pod start or teardown makes several
# calls in a row, and an idle shim keeps no thread.
WORKER_IDLE = 1.0


class _Workers:
    """Threads for blocking calls, reused while there is work: starting a thread per call cost ~140 us of
    CPU against ~18 us for handing work to a waiting one (measured: 2000 calls of each in one process),
    several times on every container's create and delete. A thread is started only when none is waiting,
    so a slow call (the cgroup lock's grace period) never holds up a quick one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0  # threads blocked on the queue that no submit has counted on yet
        self._work: SimpleQueue[Callable[[], None]] = SimpleQueue()

    def submit(self, work: Callable[[], None]) -> None:
        with self._lock:
            start = self._waiting == 0
            if not start:
                self._waiting -= 1
        self._work.put(work)
        if start:
            threading.Thread(target=self._serve, name="to-thread", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                work = self._work.get(timeout=WORKER_IDLE)
            except Empty:
                with self._lock:
                    if self._waiting > 0:  # not counted on by a submit: this thread may end
                        self._waiting -= 1
                        return
                continue  # a submit counted on a waiting thread: its work is on the way
            work()
            with self._lock:
                self._waiting += 1


_workers = _Workers()


async def to_thread(fn: Callable[..., object], *args: object) -> object:
    """Run a blocking function in a worker thread (the shim's such calls are short and few)."""
    loop = get_running_loop()
    fut = Future()

    def done(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as e:
            value, ok = e, False
        loop.call_soon_threadsafe(done, ok, value)

    _workers.submit(work)
    return await fut


async def wait_fd(fd: int, write: bool = False) -> None:
    """Wait until a non-blocking descriptor is readable (or writable)."""
    loop = get_running_loop()
    ready = Future()
    (loop.add_writer if write else loop.add_reader)(fd, _set_if_pending, ready, None)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


# -- unix stream server ------------------------------------------------------------------------------
_HIGH_WATER = 64 * 1024


class Connection:
    """One accepted stream: readexactly() for framed reads, write()/drain() with a bounded backlog."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._closed = False
        self._drained: Future | None = None
        self._read_waiter: Future | None = None
        self._fd = sock.fileno()

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self._closed:
                raise ConnectionResetError("connection closed")
            if self._eof:
                partial = bytes(self._buf)
                self._buf.clear()
                raise IncompleteReadError(partial, n)
            try:
                data = self.sock.recv(max(65536, n - len(self._buf)))
            except BlockingIOError:
                await self._readable()
                continue
            if not data:
                self._eof = True
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _readable(self) -> None:
        loop = get_running_loop()
        fut = self._read_waiter = Future()
        loop.add_reader(self._fd, _set_if_pending, fut, None)
        try:
            await fut
        finally:
            self._read_waiter = None
            if not self._closed:
                loop.remove_reader(self._fd)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._out:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:
                pass
            except OSError:
                self.close()
                return
            if not data:
                return
            get_running_loop().add_writer(self._fd, self._flush)
        self._out += data

    def _flush(self) -> None:
        try:
            del self._out[:self.sock.send(self._out)]
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not self._out:
            get_running_loop().remove_writer(self._fd)
        if len(self._out) <= _HIGH_WATER and self._drained is not None:
            _set_if_pending(self._drained, None)
            self._drained = None

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection closed")
        if len(self._out) > _HIGH_WATER:
            self._drained = self._drained or Future()
            await self._drained

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = get_running_loop()
        loop.remove_writer(self._fd)
        loop.remove_reader(self._fd)
        for waiter in (self._drained, self._read_waiter):
            if waiter is not None:
                _set_if_pending(waiter, None)
        self.sock.close()


class UnixServer:
    def __init__(self, sock: socket.socket, on_conn: Callable[[Connection], Coroutine[object, object, None]]) -> None:
        sock.setblocking(False)
        self.sock, self._on_conn = sock, on_conn
        get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the connections we have
                _report(f"shim accept failed: {e}")
                return
            Task(self._on_conn(Connection(conn)))

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


async def sock_accept(sock: socket.socket) -> tuple[socket.socket, object]:
    sock.setblocking(False)
    while True:
        try:
            return sock.accept()
        except BlockingIOError:
            await wait_fd(sock.fileno())
