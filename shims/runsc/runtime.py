"""runsc (gVisor) as the shim's OCI runtime: the runc command line plus what gVisor does differently.

runsc speaks runc's CLI, with three differences the shim must account for:
- extra global flags (platform, network, overlay, debug log) come from the handler's config, passed
  to the shim by shimd in SHIMD_RUNTIME_ARGS (a JSON list);
- every container of a pod runs in one sandbox, so the pid runsc reports for a container is the
  sandbox's, which outlives the container: exits are learnt from `runsc wait <id>` instead;
- there is no `update`, and `ps --format json` prints process objects, not pids.

Imported by the runc shim only when SHIMD_RUNTIME_FLAVOR=runsc, so plain runc shims never load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from shimproto.messages import CONTAINER_TYPE_ANNOTATION
from shims.common import aio
from shims.common.procs import CommandError, ExitInfo, Reaper, run
from shims.runc.runc import Runc, RuncError, RuncOptions

# Statuses reported when runsc cannot say: a container deleted before it ever ran was killed.
NEVER_STARTED_STATUS = 128 + 9
UNKNOWN_STATUS = 255
WAIT_OUTPUT_LIMIT = 64 * 1024
CONTAINER_TYPE = CONTAINER_TYPE_ANNOTATION
# `runsc wait` lasts as long as the container; a bound is still required by run(), so a year.
WAIT_FOREVER = 365 * 86400.0


def global_args() -> list[str]:
    raw = os.environ.get("SHIMD_RUNTIME_ARGS", "")
    if not raw:
        return []
    args = json.loads(raw)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("SHIMD_RUNTIME_ARGS must be a JSON list of strings")
    return args


def _is_root(bundle: str) -> bool:
    """A container that creates its sandbox (the pod's pause, or a lone container) rather than joining one."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            annotations = json.load(f).get("annotations") or {}
    except (OSError, ValueError):
        return False
    return annotations.get(CONTAINER_TYPE, "sandbox") == "sandbox"


class Runsc(Runc):
    # The sandbox root's create/start split is how runsc sets the sandbox up: kept.
    runs_detached = False
    # Its pids are the sandbox's own; only runsc can signal them.
    signals_directly = False
    # Its state is runsc's own layout, and a sandbox's cgroups are runsc's business.
    deletes_reaped_itself = False
    signals_cgroup_itself = False

    def __init__(self, reaper: Reaper, opts: RuncOptions, log_path: str, timeout: float) -> None:
        super().__init__(reaper, opts, log_path, timeout)
        self.extra = global_args()
        self._exits: dict[str, aio.Future[ExitInfo]] = {}
        self._waiters: dict[str, aio.Future[None]] = {}
        self._stdio: dict[str, tuple[int, int, int]] = {}
        self._roots: set[str] = set()

    def _argv(self, *args: str) -> list[str]:
        argv = super()._argv()
        return argv + self.extra + list(args)

    # --- exits -----------------------------------------------------------------------------------
    def watch_exit(self, cid: str, exec_id: str, pid: int) -> aio.Future[ExitInfo]:
        if exec_id or cid in self._roots:
            # A detached `runsc exec` leaves a host process that forwards signals to the sandboxed
            # one and exits with its status; the sandbox process ends with its root container. Reaping
            # is enough for both (and saves a `runsc wait` process per pod).
            return self.reaper.watch(pid)
        fut = self._exits.get(cid)
        if fut is None:
            fut = aio.get_running_loop().create_future()
            self._exits[cid] = fut
        return fut

    def _settle(self, cid: str, status: int) -> None:
        fut = self._exits.get(cid)
        if fut is not None and not fut.done():
            fut.set_result((status, time.time_ns()))

    async def _wait(self, cid: str) -> None:
        """Runs `runsc wait` for the container's whole life (it has no timeout by design)."""
        status = UNKNOWN_STATUS
        try:
            _, out, _ = await run(self.reaper, self._argv("wait", cid), WAIT_FOREVER, limit=WAIT_OUTPUT_LIMIT)
            status = int(json.loads(out)["exitStatus"])
        except (CommandError, ValueError, KeyError, TypeError, OSError):
            pass  # the container vanished under us (force-deleted): how it ended is unknown
        finally:
            self._waiters.pop(cid, None)
        self._settle(cid, status)

    # --- stdio -----------------------------------------------------------------------------------
    async def create(self, cid: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
                     console_socket: str = "") -> None:
        if await aio.to_thread(_is_root, bundle):
            self._roots.add(cid)
        await super().create(cid, bundle, pid_file, stdio, console_socket)
        if cid in self._roots:
            return
        # A container joining a sandbox gets its stdio from `runsc start`, not `runsc create`: keep
        # copies until then (the shim closes its child ends right after create).
        self._close_stdio(cid)
        self._stdio[cid] = tuple(os.dup(fd) if fd >= 0 else -1 for fd in stdio)  # type: ignore[assignment]

    def _close_stdio(self, cid: str) -> None:
        for fd in self._stdio.pop(cid, ()):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def start(self, cid: str) -> None:
        stdio = self._stdio.get(cid)
        try:
            if stdio is not None and min(stdio) >= 0:
                await self._run("start", cid, stdio=stdio)
            else:
                await super().start(cid)
        finally:
            self._close_stdio(cid)
        if cid not in self._waiters and cid not in self._roots:
            self._waiters[cid] = aio.ensure_future(self._wait(cid))

    async def delete(self, cid: str, force: bool = False) -> None:
        try:
            await super().delete(cid, force)
        finally:
            self._close_stdio(cid)
            if cid not in self._waiters:
                self._settle(cid, NEVER_STARTED_STATUS)
            self._exits.pop(cid, None)
            self._roots.discard(cid)

    # --- what runsc does not do like runc ------------------------------------------------------
    @property
    def checkpoint_unsupported(self) -> str:  # type: ignore[override]
        why = ("runsc cannot checkpoint one container of a pod: `runsc checkpoint` saves the whole gVisor "
               "sandbox (every container of the pod) and `runsc restore` only recreates a sandbox, not a "
               "container inside a running one")
        if "--network=host" in self.extra:
            # Measured with runsc 20221219: it refuses any checkpoint of a sandbox on the host network.
            why += ("; with this handler's --network=host it refuses even the sandbox (\"checkpoint not "
                    "supported when using hostinet\")")
        return why + "; use a runc handler for CheckpointContainer"

    async def update(self, cid: str, resources_json: bytes) -> None:
        raise RuncError("runsc cannot update the resources of a running container")

    async def ps(self, cid: str) -> list[int]:
        out = await self._run("ps", "--format", "json", cid)
        procs = json.loads(out) or []
        # Sandbox-internal pids: they mean nothing on the host, but they are what the sandbox has.
        return [int(p["PID"] if isinstance(p, dict) else p) for p in procs]

    def close(self) -> None:
        for t in self._waiters.values():
            t.cancel()
        for cid in list(self._stdio):
            self._close_stdio(cid)
