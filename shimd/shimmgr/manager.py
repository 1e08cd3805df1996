"""The shim manager: one shim per pod, reached over the shim v2 task API.

It keeps one TaskClient per pod (the shim itself is started by the pod's runtime, shimd/runtimes/)
and owns one exit watcher per running task. Exits are reported through `on_exit`; a shim that
cannot be reached any more is reported through `on_shim_dead`. Nothing here knows about CRI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import betterproto.lib.google.protobuf as pb

from shimd import errors, log, subproc
from shimd.api.containerd import types as ctypes
from shimd.api.containerd.runc import v1 as runc_options
from shimd.api.containerd.task import v2 as task
from shimd.config import Config
from shimd.runtimes.registry import Runtimes
from shimd.shimmgr import strays
from shimd.shimmgr.task_client import TaskClient
from shimproto.messages import RUNC_CHECKPOINT_OPTIONS_TYPE_URL
from shimproto.ttrpc import UNIMPLEMENTED

# Wait is re-issued after this long, so no call blocks without a bound.
WAIT_SLICE = 300.0


@dataclass
class ExitInfo:
    exit_status: int
    exited_at_ns: int


ExitCallback = Callable[[str, str, ExitInfo], Awaitable[None]]  # (pod_id, task_id, exit)
DeadCallback = Callable[[str], Awaitable[None]]  # pod_id


def ts_ns(ts: datetime | None) -> int:
    if ts is None:
        return 0
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    ns = int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1000
    return ns if ns > 0 else 0


class ShimManager:
    def __init__(self, cfg: Config, state_dir: Path, runtimes: Runtimes, on_exit: ExitCallback,
                 on_shim_dead: DeadCallback) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.runtimes = runtimes
        self.timeout = cfg.daemon.runtime_timeout_seconds
        self.on_exit = on_exit
        self.on_shim_dead = on_shim_dead
        self._clients: dict[str, TaskClient] = {}
        self._addresses: dict[str, str] = {}
        self._watchers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._connect_lock: dict[str, asyncio.Lock] = {}
        self.log = log.get("shimmgr")

    # --- shims -------------------------------------------------------------------------------
    async def launch(self, pod_id: str, handler: str, bundle: Path) -> str:
        """Start the pod's shim the way its runtime does it; its address is kept for client()."""
        address = await self.runtimes.get(handler).launch(pod_id, bundle)
        self._addresses[pod_id] = address
        return address

    async def kill_strays(self, pod_id: str, pod_dir: Path) -> list[int]:
        """Shims of pod_id running in pod_dir that nothing recorded (a RunPodSandbox cut short by a crash)."""
        return await strays.kill(pod_id, pod_dir)

    def remember(self, pod_id: str, address: str) -> None:
        """After a restart: the shim's address comes from the pod record."""
        if address:
            self._addresses[pod_id] = address

    async def client(self, pod_id: str) -> TaskClient:
        c = self._clients.get(pod_id)
        if c is not None and not c.closed:
            return c
        lock = self._connect_lock.setdefault(pod_id, asyncio.Lock())
        async with lock:
            c = self._clients.get(pod_id)
            if c is not None and not c.closed:
                return c
            address = self._addresses.get(pod_id)
            if not address:
                raise errors.Unavailable(f"pod sandbox {pod_id} has no shim")
            c = await TaskClient.open(address, timeout=min(self.timeout, 10.0))
            self._clients[pod_id] = c
            return c

    async def shim_alive(self, pod_id: str) -> bool:
        try:
            c = await self.client(pod_id)
            await c.connect_rpc(task.ConnectRequest(id=pod_id), timeout=5.0)
            return True
        except errors.NotFound:
            return True  # the shim answered; it just has no task by that id
        except (TimeoutError, errors.ShimdError, OSError):
            return False

    async def shutdown(self, pod_id: str) -> None:
        """Ask the shim to exit and wait until it has; a shim that is already gone is fine."""
        await self._stop_watchers(pod_id)
        c = self._clients.pop(pod_id, None)
        shim_pid = 0
        try:
            if c is None and self._addresses.get(pod_id):
                c = await TaskClient.open(self._addresses[pod_id], timeout=5.0)
            if c is not None:
                with contextlib.suppress(errors.ShimdError, OSError, TimeoutError, ConnectionError):
                    shim_pid = int((await c.connect_rpc(task.ConnectRequest(id=pod_id), timeout=5.0)).shim_pid)
                with contextlib.suppress(errors.ShimdError, OSError, TimeoutError, ConnectionError):
                    await c.shutdown(task.ShutdownRequest(id=pod_id, now=True), timeout=10.0)
        except (errors.ShimdError, OSError, TimeoutError):
            pass
        finally:
            if c is not None:
                await c.close()
            self._addresses.pop(pod_id, None)
            self._connect_lock.pop(pod_id, None)
        if shim_pid:
            await _reap_shim(shim_pid, self.log.bind(pod_id=pod_id))

    # --- tasks -------------------------------------------------------------------------------
    async def create(self, pod_id: str, handler: str, task_id: str, bundle: Path, rootfs: list[dict[str, Any]],
                     stdio: tuple[str, str, str], terminal: bool, checkpoint: str = "") -> int:
        """Creates the task; with `checkpoint` (a directory of CRIU images) Start restores it from there."""
        rt = self.runtimes.get(handler)
        c = await self.client(pod_id)
        mounts = [ctypes.Mount(type=m["type"], source=m["source"], target=m.get("target", ""),
                               options=list(m.get("options", []))) for m in rootfs]
        req = task.CreateTaskRequest(id=task_id, bundle=str(bundle), rootfs=mounts, terminal=terminal,
                                     stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], checkpoint=checkpoint,
                                     options=rt.runtime_options())
        resp = await c.create(req, timeout=self.timeout)
        return int(resp.pid)

    async def start(self, pod_id: str, task_id: str, exec_id: str = "") -> int:
        c = await self.client(pod_id)
        resp = await c.start(task.StartRequest(id=task_id, exec_id=exec_id), timeout=self.timeout)
        return int(resp.pid)

    async def state(self, pod_id: str, task_id: str) -> task.StateResponse:
        c = await self.client(pod_id)
        return await c.state(task.StateRequest(id=task_id), timeout=self.timeout)

    async def kill(self, pod_id: str, task_id: str, signal: int, all_processes: bool = False,
                   exec_id: str = "") -> None:
        c = await self.client(pod_id)
        await c.kill(task.KillRequest(id=task_id, exec_id=exec_id, signal=signal, all=all_processes),
                     timeout=self.timeout)

    async def delete(self, pod_id: str, task_id: str, exec_id: str = "") -> ExitInfo:
        c = await self.client(pod_id)
        resp = await c.delete(task.DeleteRequest(id=task_id, exec_id=exec_id), timeout=self.timeout)
        return ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at))

    async def checkpoint(self, pod_id: str, task_id: str, image_path: Path, work_path: Path, *, leave_running: bool,
                         timeout: float = 0) -> None:
        """CRIU images of the task into image_path (logs into work_path); a shim that cannot is FailedPrecondition."""
        c = await self.client(pod_id)
        opts = runc_options.CheckpointOptions(exit=not leave_running, image_path=str(image_path),
                                              work_path=str(work_path))
        req = task.CheckpointTaskRequest(id=task_id, path=str(image_path),
                                         options=pb.Any(type_url=RUNC_CHECKPOINT_OPTIONS_TYPE_URL, value=bytes(opts)))
        try:
            await c.checkpoint(req, timeout=timeout or self.timeout)
        except errors.ShimdError as e:
            if getattr(e, "ttrpc_code", None) == UNIMPLEMENTED:
                raise errors.FailedPrecondition(f"the runtime of pod sandbox {pod_id} cannot checkpoint: {e}") from None
            raise

    async def update(self, pod_id: str, task_id: str, resources: Any) -> None:
        c = await self.client(pod_id)
        await c.update(task.UpdateTaskRequest(id=task_id, resources=resources), timeout=self.timeout)

    async def reopen_log(self, pod_id: str, task_id: str) -> None:
        c = await self.client(pod_id)
        await c.reopen_log(task_id, timeout=self.timeout)

    async def wait(self, pod_id: str, task_id: str, exec_id: str = "", timeout: float = WAIT_SLICE) -> ExitInfo:
        c = await self.client(pod_id)
        resp = await c.wait(task.WaitRequest(id=task_id, exec_id=exec_id), timeout=timeout)
        return ExitInfo(int(resp.exit_status), ts_ns(resp.exited_at))

    # --- exit watchers -----------------------------------------------------------------------
    def watch(self, pod_id: str, task_id: str) -> None:
        key = (pod_id, task_id)
        old = self._watchers.get(key)
        if old is not None and not old.done():
            return
        self._watchers[key] = asyncio.create_task(self._watch(pod_id, task_id), name=f"watch-{task_id[:12]}")

    async def _watch(self, pod_id: str, task_id: str) -> None:
        lg = self.log.bind(pod_id=pod_id, container_id=task_id)
        failures = 0
        while True:
            try:
                info = await self.wait(pod_id, task_id)
            except TimeoutError:
                continue
            except errors.NotFound:
                lg.warning("task vanished from its shim")
                info = ExitInfo(255, 0)
            except (errors.ShimdError, OSError, ConnectionError) as e:
                failures += 1
                self._clients.pop(pod_id, None)
                if not await self.shim_alive(pod_id):
                    lg.error("shim is gone", error=str(e))
                    self._watchers.pop((pod_id, task_id), None)
                    await self.on_shim_dead(pod_id)
                    return
                await asyncio.sleep(min(0.1 * failures, 2.0))
                continue
            self._watchers.pop((pod_id, task_id), None)
            try:
                await self.on_exit(pod_id, task_id, info)
            except Exception:  # the callback must never kill the watcher silently
                lg.exception("exit handling failed")
            return

    async def _stop_watchers(self, pod_id: str) -> None:
        tasks = [t for (p, _), t in list(self._watchers.items()) if p == pod_id]
        for (p, tid) in [k for k in self._watchers if k[0] == pod_id]:
            self._watchers.pop((p, tid), None)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def close(self) -> None:
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for t in watchers:
            t.cancel()
        for t in watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()
        self._clients.clear()


async def _reap_shim(pid: int, lg: Any, grace: float = 5.0) -> None:
    """A shim exits shortly after Shutdown; one that lingers past the grace time is killed."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return
    try:
        if not await subproc.wait_exit(fd, grace):
            lg.warning("shim did not exit after Shutdown; killing it", shim_pid=pid)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            await subproc.wait_exit(fd, grace)
    finally:
        os.close(fd)
