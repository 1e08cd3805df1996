"""Async ttrpc client for a shim's containerd.task.v2.Task service (and shimd.shim.v1.Logs).

One connection per shim; concurrent calls are multiplexed by stream id and each is bounded by its
own timeout. ttrpc status codes become shimd.errors classes; a vanished shim is Unavailable. A call
that times out raises CallTimeout, which is both errors.DeadlineExceeded and TimeoutError.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import betterproto
import betterproto.lib.google.protobuf as pb

from shimd import errors, log
from shimd.api.containerd.task import v2 as task
from shimproto import messages as wire
from shimproto import ttrpc

M = TypeVar("M", bound=betterproto.Message)


class CallTimeout(errors.DeadlineExceeded, TimeoutError):
    pass


_ERRORS: dict[int, type[errors.ShimdError]] = {
    ttrpc.INVALID_ARGUMENT: errors.InvalidArgument,
    ttrpc.NOT_FOUND: errors.NotFound,
    ttrpc.ALREADY_EXISTS: errors.AlreadyExists,
    ttrpc.FAILED_PRECONDITION: errors.FailedPrecondition,
    ttrpc.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    ttrpc.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    ttrpc.UNAVAILABLE: errors.Unavailable,
    ttrpc.CANCELLED: errors.Unavailable,
}


def status_error(code: int, message: str, where: str) -> errors.ShimdError:
    """The domain error for a ttrpc status; `.ttrpc_code` keeps the original code (e.g. UNIMPLEMENTED)."""
    cls = _ERRORS.get(code, errors.ShimdError)
    e = cls(f"{where}: {message}")
    e.ttrpc_code = code  # type: ignore[attr-defined]
    return e


class _ClassOrInstance:
    def __init__(self, on_class: str, on_instance: str) -> None:
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        return getattr(objtype, self.on_class) if obj is None else getattr(obj, self.on_instance)


class TaskClient:
    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self._reader, self._writer = reader, writer
        self._next_stream = 1
        self._pending: dict[int, asyncio.Future[tuple[int, str, bytes]]] = {}
        self._closed = False
        self._log = log.get("task_client", address=address)
        self._read_task = asyncio.create_task(self._read_loop(), name=f"ttrpc-read-{address[-12:]}")

    @classmethod
    async def open(cls, address: str, timeout: float) -> TaskClient:
        path = address.removeprefix("unix://")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=ttrpc.MAX_MESSAGE + ttrpc.HEADER_LEN)
        except TimeoutError:
            raise CallTimeout(f"shim at {address}: connect timed out after {timeout:g}s") from None
        except OSError as e:
            raise errors.Unavailable(f"shim at {address} is not reachable: {e.strerror or e}") from None
        return cls(address, reader, writer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._writer.wait_closed()
        self._read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._read_task
        self._fail_pending("client closed")

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(errors.Unavailable(f"shim at {self.address}: {why}"))
        self._pending.clear()

    async def _read_loop(self) -> None:
        why = "connection closed by the shim"
        try:
            while True:
                stream_id, mtype, _flags, payload = await ttrpc.read_frame(self._reader)
                if mtype != ttrpc.TYPE_RESPONSE:
                    continue
                fut = self._pending.pop(stream_id, None)
                if fut is not None and not fut.done():
                    try:
                        fut.set_result(ttrpc.decode_response(payload))
                    except ValueError as e:
                        fut.set_exception(errors.ShimdError(f"shim at {self.address}: bad response: {e}"))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ttrpc.FrameTooLarge as e:
            why = str(e)
        finally:
            self._closed = True
            self._writer.close()
            self._fail_pending(why)

    async def call(self, service: str, method: str, payload: bytes, timeout: float) -> bytes:
        """One raw unary call; returns the response payload."""
        if self._closed:
            raise errors.Unavailable(f"shim at {self.address}: connection is closed")
        stream_id = self._next_stream
        self._next_stream += 2  # client streams are odd
        fut: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            frame = ttrpc.pack_frame(stream_id, ttrpc.TYPE_REQUEST,
                                     ttrpc.encode_request(service, method, payload, int(timeout * 1e9)))
        except ttrpc.FrameTooLarge as e:
            self._pending.pop(stream_id, None)
            raise errors.ResourceExhausted(f"{method} request: {e}") from None
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(frame)
                await self._writer.drain()
                code, message, body = await fut
        except TimeoutError:
            raise CallTimeout(f"shim {method} timed out after {timeout:g}s") from None
        except (ConnectionError, OSError) as e:
            raise errors.Unavailable(f"shim at {self.address}: {e}") from None
        finally:
            self._pending.pop(stream_id, None)
        if code != ttrpc.OK:
            raise status_error(code, message, f"shim {method}")
        return body

    async def _task(self, method: str, req: betterproto.Message, resp: type[M], timeout: float) -> M:
        body = await self.call(wire.TASK_SERVICE, method, bytes(req), timeout)
        return resp().parse(body)

    # -- containerd.task.v2.Task ------------------------------------------------------------------
    async def state(self, req: task.StateRequest, *, timeout: float) -> task.StateResponse:
        return await self._task("State", req, task.StateResponse, timeout)

    async def create(self, req: task.CreateTaskRequest, *, timeout: float) -> task.CreateTaskResponse:
        return await self._task("Create", req, task.CreateTaskResponse, timeout)

    async def start(self, req: task.StartRequest, *, timeout: float) -> task.StartResponse:
        return await self._task("Start", req, task.StartResponse, timeout)

    async def delete(self, req: task.DeleteRequest, *, timeout: float) -> task.DeleteResponse:
        return await self._task("Delete", req, task.DeleteResponse, timeout)

    async def pids(self, req: task.PidsRequest, *, timeout: float) -> task.PidsResponse:
        return await self._task("Pids", req, task.PidsResponse, timeout)

    async def pause(self, req: task.PauseRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Pause", req, pb.Empty, timeout)

    async def resume(self, req: task.ResumeRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Resume", req, pb.Empty, timeout)

    async def checkpoint(self, req: task.CheckpointTaskRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Checkpoint", req, pb.Empty, timeout)

    async def kill(self, req: task.KillRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Kill", req, pb.Empty, timeout)

    async def exec(self, req: task.ExecProcessRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Exec", req, pb.Empty, timeout)

    async def resize_pty(self, req: task.ResizePtyRequest, *, timeout: float) -> pb.Empty:
        return await self._task("ResizePty", req, pb.Empty, timeout)

    async def close_io(self, req: task.CloseIoRequest, *, timeout: float) -> pb.Empty:
        return await self._task("CloseIO", req, pb.Empty, timeout)

    async def update(self, req: task.UpdateTaskRequest, *, timeout: float) -> pb.Empty:
        return await self._task("Update", req, pb.Empty, timeout)

    async def wait(self, req: task.WaitRequest, *, timeout: float) -> task.WaitResponse:
        return await self._task("Wait", req, task.WaitResponse, timeout)

    async def stats(self, req: task.StatsRequest, *, timeout: float) -> task.StatsResponse:
        return await self._task("Stats", req, task.StatsResponse, timeout)

    async def connect_rpc(self, req: task.ConnectRequest, *, timeout: float) -> task.ConnectResponse:
        return await self._task("Connect", req, task.ConnectResponse, timeout)


    # `TaskClient.connect(address, timeout)` opens a connection; `client.connect(ConnectRequest)` is the
    # Connect RPC. Both spellings are part of the interface, so one name serves both.
    connect = _ClassOrInstance("open", "connect_rpc")

    async def shutdown(self, req: task.ShutdownRequest, *, timeout: float) -> pb.Empty:
        """A shim may exit before its answer is sent; a connection closed on us counts as done."""
        try:
            return await self._task("Shutdown", req, pb.Empty, timeout)
        except errors.Unavailable:
            return pb.Empty()

    # -- shimd.shim.v1.Logs -----------------------------------------------------------------------
    async def reopen_log(self, container_id: str, *, timeout: float) -> None:
        """Reopen the container's CRI log file (after kubelet renamed it for rotation)."""
        await self.call(wire.LOGS_SERVICE, "Reopen", bytes(task.ConnectRequest(id=container_id)), timeout)
