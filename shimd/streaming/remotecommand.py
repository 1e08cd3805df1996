"""Exec/attach independent of the wire protocol: run the backend, report the outcome.

The SPDY and WebSocket front ends build a StreamIO from their streams/channels and hand over a
function that writes the error/status channel; this module owns the backend task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from shimd.streaming import status
from shimd.streaming.backend import StreamBackend, StreamIO
from shimd.streaming.tokens import AttachRequest, ExecRequest

# Bytes of stdin held for a backend that reads slowly before we stop taking more from the client.
STDIN_BUFFER = 256 * 1024


class FlowGate:
    """Stands in for a transport behind an asyncio.StreamReader we feed by hand: the reader calls
    pause_reading/resume_reading as its buffer fills and drains, and the feeder waits on `wait()`."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    def pause_reading(self) -> None:
        self._open.clear()

    def resume_reading(self) -> None:
        self._open.set()

    def is_paused(self) -> bool:
        return not self._open.is_set()

    async def wait(self, alive: Callable[[], bool]) -> bool:
        """Wait until the reader wants more; False if `alive()` turns false meanwhile."""
        while not self._open.is_set():
            if not alive():
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._open.wait()
        return True


def new_stdin() -> tuple[asyncio.StreamReader, FlowGate]:
    reader = asyncio.StreamReader(limit=STDIN_BUFFER // 2)
    gate = FlowGate()
    reader.set_transport(gate)  # type: ignore[arg-type]
    return reader, gate


class ResizeDecoder:
    """The resize stream/channel carries a sequence of JSON objects {"Width": w, "Height": h}."""

    def __init__(self, queue: asyncio.Queue[tuple[int, int]], log: Any) -> None:
        self._queue, self._log = queue, log
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> None:
        self._buf += data.decode(errors="replace")
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return
            try:
                obj, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                if len(text) > 4096:  # not JSON, and never going to be
                    self._log.warning("dropping undecodable resize data")
                    self._buf = ""
                else:
                    self._buf = text
                return
            self._buf = text[end:]
            try:
                size = (int(obj["Width"]), int(obj["Height"]))
            except (KeyError, TypeError, ValueError):
                self._log.warning("ignoring malformed resize event", event=str(obj)[:200])
                continue
            if self._queue.full():  # only the latest size matters
                self._queue.get_nowait()
            self._queue.put_nowait(size)


async def run(request: ExecRequest | AttachRequest, backend: StreamBackend, io: StreamIO,
              write_status: Callable[[bytes], Awaitable[None]], json_status: bool,
              disconnected: asyncio.Event, log: Any) -> None:
    """Run the backend call; if the client disconnects first, cancel it and wait for it to end."""
    if isinstance(request, ExecRequest):
        call: Awaitable[Any] = backend.exec(request.container_id, list(request.cmd), io)
    else:
        call = backend.attach(request.container_id, io)
    task: asyncio.Task[Any] = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(disconnected.wait())
    code: int | None = None
    error: str | None = None
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("client went away; cancelling backend call")
            return
        try:
            result = task.result()
            code = status.exit_code_of(result) if isinstance(request, ExecRequest) else 0
        except (ConnectionError, asyncio.CancelledError) as e:
            log.info("backend call ended with the client connection", error=repr(e))
            return
        except Exception as e:
            log.warning("backend call failed", error=str(e))
            error = str(e) or type(e).__name__
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            # The backend must clean up (kill the process) on cancellation; give it a bounded wait.
            await asyncio.wait({task}, timeout=10)
            if not task.done():
                log.error("backend call ignored cancellation")
    cmd = list(request.cmd) if isinstance(request, ExecRequest) else None
    body = status.status_v4(code, error, cmd) if json_status else status.status_text(code, error, cmd)
    log.info("stream session finished", exit_code=code, error=error)
    with contextlib.suppress(ConnectionError):
        if body:
            await write_status(body)
