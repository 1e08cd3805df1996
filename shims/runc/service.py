"""The containerd.task.v2.Task service of the runc shim, plus shimd.shim.v1.Logs.

Semantics follow containerd's runc shim: a task is a runc container (its init) plus exec
processes; exit statuses stay in memory until Delete; unknown ids answer NOT_FOUND and calls in the
wrong state FAILED_PRECONDITION.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from shimproto import messages as m
from shimproto import ttrpc
from shimproto.paths import attach_socket_path
from shimproto.proto import decode, encode
from shimproto.ttrpc import TtrpcError
from shims.common import aio
from shims.common.jsonlog import Logger
from shims.common.procs import CommandError, CommandTimeout, Reaper, run, trim_memory
from shims.common.stdio import AttachFanout, ProcessIO
from shims.common.writer import FileWriter
from shims.runc import cgroup_lock, mounts, reaped_delete, runc_state
from shims.runc.runc import Runc, RuncError, RuncOptions, criu_errors

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any

VERSION = "shimd-runc-shim/1"
SIGKILL = 9
def runc_timeout() -> float:
    """Read when used, not at import: a shim forked from the zygote gets its environment after import."""
    return float(os.environ.get("SHIMD_RUNTIME_TIMEOUT", "60"))
IO_DRAIN_TIMEOUT = 2.0
# Opening a log file waits behind the writes queued before it (bounded by the writer's high-water mark).
LOG_OPEN_TIMEOUT = 10.0
CRIU = "criu"
CONSOLE_TIMEOUT = 10.0


def _not_found(what: str) -> TtrpcError:
    return TtrpcError(ttrpc.NOT_FOUND, what)


def _precondition(what: str) -> TtrpcError:
    return TtrpcError(ttrpc.FAILED_PRECONDITION, what)


def _gone(runc_error: str) -> bool:
    """runc's (and runsc's) ways of saying the container's process is no longer there."""
    text = runc_error.lower()
    return any(m in text for m in ("not running", "no such process", "process already finished"))


def _timestamp(ns: int) -> dict[str, int] | None:
    return {"seconds": ns // 1_000_000_000, "nanos": ns % 1_000_000_000} if ns else None


class Proc:
    """A container's init (exec_id "") or one exec process."""

    def __init__(self, cid: str, exec_id: str, io: ProcessIO, terminal: bool) -> None:
        self.cid, self.exec_id, self.io, self.terminal = cid, exec_id, io, terminal
        self.pid = 0
        self.status = m.STATUS_CREATED
        self.exit_status = 0
        self.exited_at = 0
        self.exited = aio.Event()
        self.spec = b""  # exec only: the OCI process JSON
        self.watcher: aio.Future[None] | None = None

    @property
    def name(self) -> str:
        return f"exec {self.exec_id!r} of container {self.cid!r}" if self.exec_id else f"container {self.cid!r}"


class Container:
    def __init__(self, cid: str, bundle: str, runc: Runc, init: Proc, rootfs_mounted: bool) -> None:
        self.id, self.bundle, self.runc, self.init = cid, bundle, runc, init
        self.rootfs_mounted = rootfs_mounted
        self.execs: dict[str, Proc] = {}
        self.paused = False
        self.lock = aio.Lock()
        # CRIU image directory of a container created from a checkpoint: Start restores from it.
        self.restore_from = ""
        # Made running by Create (`runc run --detach`, the spec asked for it): its Start only answers.
        self.started_by_create = False
        # The init is pid 1 of a PID namespace of its own: when it dies the kernel kills every process
        # of the container, so a SIGKILL to it is all of `runc kill --all`.
        self.own_pid_ns = False
        # Once its init is reaped, Delete may do without runc (reaped_delete.py): runtime and spec allow it.
        self.delete_reaped = False
        # A signal to all its processes may do without runc (cgroup_kill.py): the runtime allows it.
        self.kill_all_itself = False


def _new_runtime(reaper: Reaper, opts: RuncOptions, log_path: str) -> Runc:
    """runc, or runsc when shimd launched this shim for a gVisor handler."""
    if os.environ.get("SHIMD_RUNTIME_FLAVOR") == "runsc":
        from shims.runsc.runtime import Runsc

        return Runsc(reaper, opts, log_path, runc_timeout())
    return Runc(reaper, opts, log_path, runc_timeout())


def _find_executable(name: str) -> str:
    """PATH lookup with os only (shutil would cost every shim its import)."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return ""


def _runc_options(any_msg: dict[str, Any] | None, namespace: str) -> RuncOptions:
    opts = RuncOptions(root=f"/run/containerd/runc/{namespace}")
    if not any_msg or not any_msg["type_url"]:
        return opts
    if not any_msg["type_url"].endswith(m.RUNC_OPTIONS_TYPE_URL):
        raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"options: unsupported type {any_msg['type_url']!r}")
    o = decode(m.RUNC_OPTIONS, any_msg["value"])
    opts.binary = o["binary_name"] or opts.binary
    opts.root = o["root"] or opts.root
    opts.systemd_cgroup = o["systemd_cgroup"]
    opts.no_pivot_root, opts.no_new_keyring = o["no_pivot_root"], o["no_new_keyring"]
    return opts


async def _receive_console(sock: socket.socket) -> int:
    """Accept runc's connection on the console socket and take the pty master it sends."""
    conn, _ = await aio.sock_accept(sock)
    with conn:
        conn.setblocking(False)
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                break
            except BlockingIOError:
                await aio.wait_fd(conn.fileno())
    if not fds:
        raise OSError("runc sent no terminal on the console socket")
    os.set_inheritable(fds[0], False)
    return fds[0]


class TaskService:
    def __init__(self, namespace: str, pod_id: str, socket_dir: str, reaper: Reaper, writer: FileWriter,
                 log: Logger, on_shutdown: Any) -> None:
        self.namespace, self.pod_id, self.socket_dir = namespace, pod_id, socket_dir
        self.reaper, self.writer, self.log = reaper, writer, log
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._console_seq = 0
        self._criu_checked = False

    # -- plumbing ---------------------------------------------------------------------------------
    def services(self) -> list[ttrpc.Service]:
        task = ttrpc.Service(m.TASK_SERVICE)
        for method, (req, resp) in m.TASK_METHODS.items():
            task.register(method, req, resp, self._guard(getattr(self, method.lower())))
        logs = ttrpc.Service(m.LOGS_SERVICE)
        logs.register("Reopen", *m.LOGS_METHODS["Reopen"], self._guard(self.reopen))
        return [task, logs]

    def _guard(self, fn: Any) -> Any:
        async def call(req: dict[str, Any]) -> dict[str, Any]:
            try:
                return await fn(req)  # type: ignore[no-any-return]
            except (RuncError, CommandTimeout, OSError, ValueError) as e:
                self.log.error("call failed", method=fn.__name__, id=req.get("id", ""), error=str(e))
                code = ttrpc.DEADLINE_EXCEEDED if isinstance(e, CommandTimeout) else ttrpc.UNKNOWN
                raise TtrpcError(code, str(e)) from None

        call.__name__ = fn.__name__
        return call

    def _container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise _not_found(f"container {cid!r} not found in shim of pod {self.pod_id!r}")
        return c

    def _proc(self, cid: str, exec_id: str) -> Proc:
        c = self._container(cid)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise _not_found(f"exec {exec_id!r} not found in container {cid!r}")
        return p

    def _watch(self, proc: Proc, exit_fut: aio.Future[tuple[int, int]]) -> None:
        proc.watcher = aio.ensure_future(self._on_exit(proc, exit_fut))

    async def _on_exit(self, proc: Proc, exit_fut: aio.Future[tuple[int, int]]) -> None:
        status, when = await exit_fut
        # Output written just before the exit must reach the log before anyone learns of the exit.
        await proc.io.drain(IO_DRAIN_TIMEOUT)
        proc.status, proc.exit_status, proc.exited_at = m.STATUS_STOPPED, status, when
        proc.exited.set()
        self.log.info("process exited", container_id=proc.cid, exec_id=proc.exec_id, pid=proc.pid,
                      exit_status=status)

    def _attach_fanout(self, cid: str, log: Logger) -> AttachFanout | None:
        """Where shimd's Attach reads the output of a container (not of the pod's pause task)."""
        if cid == self.pod_id:
            return None
        try:
            return AttachFanout(attach_socket_path(self.socket_dir, cid))
        except OSError as e:  # attach then reports it; the container itself is unaffected
            log.error("cannot serve attach", error=str(e))
            return None

    def _console_socket(self) -> tuple[socket.socket, str]:
        self._console_seq += 1
        path = os.path.join(self.socket_dir, f"c-{os.getpid()}-{self._console_seq}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        sock.listen(1)
        sock.setblocking(False)
        return sock, path

    async def _spawn_with_io(self, proc: Proc, runc_call: Any, runtime: Runc) -> int:
        """Runs runc create/exec with the process's stdio (and console socket); returns the new pid."""
        console_task: aio.Future[int] | None = None
        sock = None
        path = ""
        try:
            proc.io.prepare()
            await proc.io.open_logs(LOG_OPEN_TIMEOUT)
            if proc.terminal:
                sock, path = self._console_socket()
                console_task = aio.ensure_future(_receive_console(sock))
            pid_file = await runc_call(proc.io.stdio, path)
            console = -1
            if console_task is not None:
                async with aio.timeout(CONSOLE_TIMEOUT):
                    console = await console_task
            pid = await runtime.started_pid(pid_file)
        except BaseException:
            if console_task is not None:
                console_task.cancel()
                with contextlib.suppress(BaseException):
                    fd = await console_task
                    os.close(fd)
            proc.io.close()
            raise
        finally:
            if sock is not None:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        proc.pid = pid
        exit_fut = runtime.watch_exit(proc.cid, proc.exec_id, pid)
        proc.io.start_copies(console)
        self._watch(proc, exit_fut)
        return pid

    # -- Task service ----------------------------------------------------------------------------
    async def create(self, req: dict[str, Any]) -> dict[str, Any]:
        cid, bundle = req["id"], req["bundle"]
        if not cid:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, "id must not be empty")
        if cid in self.containers or cid in self._creating:
            raise TtrpcError(ttrpc.ALREADY_EXISTS, f"container {cid!r} already exists")
        t0 = time.monotonic()
        facts = await aio.to_thread(_spec_facts, bundle) if bundle and os.path.isabs(bundle) else None
        if facts is None:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"bundle {bundle!r} has no readable config.json")
        own_pid_ns, start_on_create, spec = facts
        opts = _runc_options(req["options"], self.namespace)
        log = self.log.bind(container_id=cid)
        restore_from = req["checkpoint"]
        runc = None
        if _is_sandbox(spec) and start_on_create and not restore_from and not req["terminal"]:
            from shims.runc import pause  # only pods with a pause task load it

            pause_plan = pause.plan(spec, bundle, opts)
            if pause_plan is not None:
                runc = pause.PauseRuntime(self.reaper, opts, os.path.join(bundle, "log.json"), runc_timeout(),
                                          pause_plan, log)
        if runc is None:
            runc = _new_runtime(self.reaper, opts, os.path.join(bundle, "log.json"))
        if restore_from:
            await self._check_checkpoint_support(runc, "restore")
            if not os.path.isabs(restore_from) or not await aio.to_thread(os.path.isdir, restore_from):
                raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"checkpoint {restore_from!r} is not a directory of "
                                 "CRIU images")
        rootfs = os.path.join(bundle, "rootfs")
        self._creating.add(cid)
        mounted = False
        # runc moves the init into its cgroups: the kernel lock that takes is taken now (cgroup_lock.py).
        warming = None if not runc.moves_into_cgroups or restore_from else aio.ensure_future(
            aio.to_thread(cgroup_lock.take))
        try:
            if runc.binary_keeps_state:
                # containerd's runc shim keeps its options here too; `shim delete` reads them after a crash.
                await aio.to_thread(_write_json, os.path.join(bundle, "options.json"), {
                    "binary_name": opts.binary, "root": opts.root, "systemd_cgroup": opts.systemd_cgroup})
            steps = {"spec": time.monotonic() - t0}
            if req["rootfs"]:
                await mounts.mount_all(self.reaper, req["rootfs"], rootfs, runc_timeout())
                mounted = True
            steps["mount"] = time.monotonic() - t0 - sum(steps.values())
            io = ProcessIO(self.writer, req["stdin"], req["stdout"], req["stderr"], req["terminal"],
                           self._attach_fanout(cid, log))
            init = Proc(cid, "", io, req["terminal"])
            pid_file = os.path.join(bundle, "init.pid")
            if restore_from:
                # As containerd's shim does: nothing runs until Start, which is `runc restore`.
                c = Container(cid, bundle, runc, init, mounted)
                c.restore_from = restore_from
                self.containers[cid] = c
                mounted = False
                log.info("created from checkpoint", checkpoint=restore_from, bundle=bundle)
                return {"pid": 0}

            # shimd starts this task right after making it, with nothing to set up in between: one runc
            # process does both (a Go start-up and a state load fewer).
            early = start_on_create and runc.runs_detached and not req["terminal"]

            async def call(stdio: tuple[int, int, int], console: str) -> str:
                if early:
                    await runc.run_detached(cid, bundle, pid_file, stdio, console)
                else:
                    await runc.create(cid, bundle, pid_file, stdio, console)
                return pid_file

            try:
                pid = await self._spawn_with_io(init, call, runc)
                steps["runc"] = time.monotonic() - t0 - sum(steps.values())
            except BaseException as e:
                # Undo a half-made container, but never one that already existed under this id.
                if "exists" not in str(e):
                    with contextlib.suppress(Exception):
                        await runc.delete(cid, force=True)
                raise
            c = Container(cid, bundle, runc, init, mounted)
            c.own_pid_ns = own_pid_ns
            c.delete_reaped = runc.deletes_reaped_itself and reaped_delete.spec_allows(spec, opts.binary,
                                                                                         opts.systemd_cgroup)
            c.kill_all_itself = runc.signals_cgroup_itself and runc_state.plain_runc(opts.binary,
                                                                                     opts.systemd_cgroup)
            if early:
                c.started_by_create = True
                if not init.exited.is_set():
                    init.status = m.STATUS_RUNNING
            self.containers[cid] = c
            mounted = False
        finally:
            self._creating.discard(cid)
            if mounted:
                mounts.unmount(rootfs)
            if warming is not None:
                await warming  # a thread's write, bounded by one grace period; it raises nothing
        log.info("created", pid=pid, bundle=bundle, runtime=runc.label,
                 ms={k: round(v * 1000, 2) for k, v in steps.items()})
        return {"pid": pid}

    async def start(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        proc = self._proc(req["id"], req["exec_id"])
        async with c.lock:
            if not proc.exec_id and c.started_by_create:
                c.started_by_create = False  # once: a second Start is refused as for any started task
                return {"pid": proc.pid}
            if proc.status != m.STATUS_CREATED or (proc.exec_id and proc.pid):
                raise _precondition(f"{proc.name} cannot be started: it is not in the created state")
            if not proc.exec_id and c.restore_from:
                return await self._restore(c)
            if not proc.exec_id:
                await c.runc.start(c.id)
                if not proc.exited.is_set():
                    proc.status = m.STATUS_RUNNING
                return {"pid": proc.pid}
            if c.init.status != m.STATUS_RUNNING:
                raise _precondition(f"container {c.id!r} is not running, cannot start exec {proc.exec_id!r}")
            spec_file = os.path.join(c.bundle, f"exec-{proc.exec_id}.json")
            pid_file = os.path.join(c.bundle, f"exec-{proc.exec_id}.pid")
            await aio.to_thread(_write_bytes, spec_file, proc.spec)

            async def call(stdio: tuple[int, int, int], console: str) -> str:
                await c.runc.exec(c.id, spec_file, pid_file, stdio, console)
                return pid_file

            try:
                pid = await self._spawn_with_io(proc, call, c.runc)
            finally:
                await aio.to_thread(_remove, spec_file, pid_file)
            if not proc.exited.is_set():
                proc.status = m.STATUS_RUNNING
            self.log.info("exec started", container_id=c.id, exec_id=proc.exec_id, pid=pid)
            return {"pid": pid}

    async def state(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        p = self._proc(req["id"], req["exec_id"])
        status = m.STATUS_PAUSED if (not p.exec_id and c.paused and p.status == m.STATUS_RUNNING) else p.status
        stdin, stdout, stderr = p.io.uris
        return {"id": c.id, "bundle": c.bundle, "pid": p.pid, "status": status, "stdin": stdin, "stdout": stdout,
                "stderr": stderr, "terminal": p.terminal, "exit_status": p.exit_status,
                "exited_at": _timestamp(p.exited_at), "exec_id": p.exec_id}

    async def kill(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        p = self._proc(req["id"], req["exec_id"])
        if p.exited.is_set():
            raise _not_found(f"{p.name}: process already finished")
        if not p.exec_id and self._signal_init(c, req["signal"], req["all"]):
            return {}
        if not p.exec_id:
            try:
                if req["all"] and c.kill_all_itself and not c.paused:
                    why = await c.runc.kill_all(c.id, req["signal"])
                    if why:
                        self.log.info("runc signalled all its processes", container_id=c.id, reason=why)
                else:
                    await c.runc.kill(c.id, req["signal"], req["all"])
            except RuncError as e:
                # The init exited between our check and runc's (not reaped yet, runc already sees it
                # stopped): as containerd's shim does, that is "already finished", not a failure.
                if p.exited.is_set() or _gone(str(e)):
                    raise _not_found(f"{p.name}: process already finished") from None
                raise
        elif not p.pid:
            raise _precondition(f"{p.name} has not been started")
        else:
            try:
                os.kill(p.pid, req["signal"])
            except ProcessLookupError:
                raise _not_found(f"{p.name}: process already finished") from None
        return {}

    def _signal_init(self, c: Container, sig: int, all_processes: bool) -> bool:
        """The init signalled with kill(2), saving a runc process on every stop; False: runc must do it.

        Safe from pid reuse: the init is our unreaped child (reaping runs on this loop, not meanwhile).
        A paused container is left to runc, which thaws it for --all; so is a signal to every process of
        a container sharing a PID namespace (only its cgroup knows them).
        """
        p = c.init
        if not (c.runc.signals_directly and p.pid and not c.paused and self.reaper.holds(p.pid)):
            return False
        if all_processes and not (c.own_pid_ns and sig == SIGKILL):
            return False
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            return False  # runc's answer then tells what became of it
        return True

    async def delete(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        p = self._proc(req["id"], req["exec_id"])
        async with c.lock:
            if p.exec_id:
                if p.pid and not p.exited.is_set():
                    raise _precondition(f"{p.name} is still running; kill it and wait before deleting")
                c.execs.pop(p.exec_id, None)
                p.io.close()
                return {"pid": p.pid, "exit_status": p.exit_status, "exited_at": _timestamp(p.exited_at)}
            if p.status == m.STATUS_RUNNING and not p.exited.is_set():
                raise _precondition(f"{p.name} is running; it must be stopped before it is deleted")
            if c.restore_from:
                pass  # a never-restored container has nothing in runc to delete
            elif c.delete_reaped and p.pid and p.exited.is_set():
                why = await c.runc.delete_reaped(c.id, c.own_pid_ns)
                if why:
                    self.log.info("runc deleted it", container_id=c.id, reason=why)
            else:
                await c.runc.delete(c.id, force=True)
            if p.pid and not p.exited.is_set():
                # A created (never started) init is killed by runc delete; collect its status.
                with contextlib.suppress(TimeoutError):
                    async with aio.timeout(5.0):
                        await p.exited.wait()
            for e in c.execs.values():
                e.io.close()
            p.io.close()
            if c.rootfs_mounted:
                await aio.to_thread(mounts.unmount, os.path.join(c.bundle, "rootfs"))
            self.containers.pop(c.id, None)
            self.log.info("deleted", container_id=c.id, exit_status=p.exit_status)
            aio.get_running_loop().call_soon(trim_memory)
            return {"pid": p.pid, "exit_status": p.exit_status, "exited_at": _timestamp(p.exited_at)}

    async def exec(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        exec_id = req["exec_id"]
        if not exec_id or "/" in exec_id or exec_id.startswith(".") or len(exec_id) > 128:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"exec_id {exec_id!r} must be 1-128 characters, without '/' "
                             "or a leading '.'")
        if exec_id in c.execs:
            raise TtrpcError(ttrpc.ALREADY_EXISTS, f"exec {exec_id!r} already exists in container {c.id!r}")
        if c.init.exited.is_set():
            raise _precondition(f"container {c.id!r} has exited; cannot exec in it")
        spec = req["spec"]
        if not spec or not spec["value"]:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, "spec: an OCI process is required")
        try:
            json.loads(spec["value"])
        except ValueError as e:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"spec: not a JSON OCI process: {e}") from None
        proc = Proc(c.id, exec_id, ProcessIO(self.writer, req["stdin"], req["stdout"], req["stderr"],
                                             req["terminal"]), req["terminal"])
        proc.spec = spec["value"]
        c.execs[exec_id] = proc
        return {}

    async def resizepty(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self._proc(req["id"], req["exec_id"])
        if p.io.console < 0:
            raise _precondition(f"{p.name} has no terminal")
        # Imported on first use: most shims never see a terminal.
        import fcntl
        import struct
        import termios

        fcntl.ioctl(p.io.console, termios.TIOCSWINSZ, struct.pack("HHHH", req["height"], req["width"], 0, 0))
        return {}

    async def closeio(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self._proc(req["id"], req["exec_id"])
        if req["stdin"]:
            p.io.close_stdin()
        return {}

    async def update(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        res = req["resources"]
        if not res or not res["value"]:
            raise TtrpcError(ttrpc.INVALID_ARGUMENT, "resources: OCI LinuxResources JSON is required")
        if c.init.exited.is_set():
            raise _precondition(f"container {c.id!r} has exited; cannot update it")
        try:
            await c.runc.update(c.id, res["value"])
        except RuncError as e:
            if c.init.exited.is_set() or _gone(str(e)):
                raise _precondition(f"container {c.id!r} has exited; cannot update it") from None
            raise
        return {}

    async def pids(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        pids = await c.runc.ps(c.id)
        by_pid = {e.pid: e.exec_id for e in c.execs.values() if e.pid}
        out = []
        for pid in pids:
            info = None
            if pid in by_pid:
                info = {"type_url": "containerd.runc.v1.ProcessDetails",
                        "value": encode(m.RUNC_PROCESS_DETAILS, {"exec_id": by_pid[pid]})}
            out.append({"pid": pid, "info": info})
        return {"processes": out}

    async def pause(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        await c.runc.pause(c.id)
        c.paused = True
        return {}

    async def resume(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        await c.runc.resume(c.id)
        c.paused = False
        return {}

    async def checkpoint(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        opts: dict[str, Any] = {}
        any_opts = req["options"]
        if any_opts and any_opts["type_url"]:
            if not any_opts["type_url"].endswith(m.RUNC_CHECKPOINT_OPTIONS_TYPE_URL):
                raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"options: unsupported type {any_opts['type_url']!r}")
            opts = decode(m.RUNC_CHECKPOINT_OPTIONS, any_opts["value"])
        image_path = opts.get("image_path") or req["path"]
        work_path = opts.get("work_path") or image_path
        for name, path in (("path", image_path), ("work_path", work_path)):
            if not path or not os.path.isabs(path):
                raise TtrpcError(ttrpc.INVALID_ARGUMENT, f"{name} {path!r} must be an absolute directory")
        await self._check_checkpoint_support(c.runc, "checkpoint")
        async with c.lock:
            if c.init.status != m.STATUS_RUNNING or c.init.exited.is_set() or c.paused:
                raise _precondition(f"container {c.id!r} is not running; only a running container can be "
                                    "checkpointed")
            await aio.to_thread(_make_dirs, image_path, work_path)
            await c.runc.checkpoint(c.id, image_path, work_path, leave_running=not opts.get("exit", False),
                                    file_locks=bool(opts.get("file_locks", False)))
        self.log.info("checkpointed", container_id=c.id, image_path=image_path, leave_running=not opts.get("exit"))
        return {}

    async def _check_checkpoint_support(self, runtime: Runc, what: str) -> None:
        """FAILED_PRECONDITION naming what is missing, before runc would fail with only "criu failed"."""
        if runtime.checkpoint_unsupported:
            raise _precondition(runtime.checkpoint_unsupported)
        if self._criu_checked:
            return
        criu = _find_executable(CRIU)
        if not criu:
            raise _precondition(f"{what} needs CRIU: the criu binary is not installed (not found in PATH "
                                f"{os.environ.get('PATH', os.defpath)!r}); install the criu package")
        try:
            _, out, err = await run(self.reaper, [criu, "check"], runc_timeout())
        except CommandError as e:
            detail = criu_errors(e.stderr) or e.stderr.strip()[-500:] or f"exit status {e.status}"
            raise _precondition(f"{what} needs CRIU, and `criu check` fails on this host: {detail}") from None
        self._criu_checked = True  # only success is kept: criu may be installed or fixed later
        self.log.info("criu check passed", criu=criu, output=(out + err).decode(errors="replace").strip()[:200])

    async def _restore(self, c: Container) -> dict[str, Any]:
        """Start of a container created from a checkpoint: `runc restore` with the new stdio."""
        proc = c.init
        pid_file = os.path.join(c.bundle, "init.pid")
        work_path = os.path.join(c.bundle, "criu-work")
        await aio.to_thread(_make_dirs, work_path)

        async def call(stdio: tuple[int, int, int], console: str) -> str:
            await c.runc.restore(c.id, c.bundle, c.restore_from, work_path, pid_file, stdio, console)
            return pid_file

        try:
            pid = await self._spawn_with_io(proc, call, c.runc)
        except BaseException:
            # runc restore may leave a half-made container behind; Delete must remove it.
            c.restore_from = ""
            with contextlib.suppress(Exception):
                await c.runc.delete(c.id, force=True)
            raise
        c.restore_from = ""
        if not proc.exited.is_set():
            proc.status = m.STATUS_RUNNING
        self.log.info("restored", container_id=c.id, pid=pid)
        return {"pid": pid}

    async def wait(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self._proc(req["id"], req["exec_id"])
        if p.exec_id and not p.pid:
            raise _precondition(f"{p.name} has not been started")
        await p.exited.wait()
        return {"exit_status": p.exit_status, "exited_at": _timestamp(p.exited_at)}

    async def stats(self, req: dict[str, Any]) -> dict[str, Any]:
        raise TtrpcError(ttrpc.UNIMPLEMENTED, "stats are not implemented by this shim yet")

    async def connect(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self.containers.get(req["id"])
        return {"shim_pid": os.getpid(), "task_pid": c.init.pid if c else 0, "version": VERSION}

    async def shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.containers and not req["now"]:
            return {}
        self.log.info("shutting down", containers=len(self.containers), now=req["now"])
        # Answer first: the response is written as this handler returns, before the loop's next turn
        # runs the callback (shimd waits for our exit, so every ms here is on StopPodSandbox's path).
        aio.get_running_loop().call_soon(self.on_shutdown)
        return {}

    # -- shimd.shim.v1.Logs -----------------------------------------------------------------------
    async def reopen(self, req: dict[str, Any]) -> dict[str, Any]:
        c = self._container(req["id"])
        if c.init.io.cri is None:
            raise _precondition(f"container {c.id!r} does not log to a CRI log file")
        await c.init.io.reopen_log(LOG_OPEN_TIMEOUT)
        return {}

    def close(self) -> None:
        for c in self.containers.values():
            c.runc.close()
            for p in [c.init, *c.execs.values()]:
                if p.watcher is not None:
                    p.watcher.cancel()
                p.io.close()


def _spec_facts(bundle: str) -> tuple[bool, bool, dict[str, Any]] | None:
    """From the bundle's spec: whether the init gets a PID namespace of its own, whether shimd asked
    for the task to be started by Create, and the spec; None: there is no readable spec."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(spec, dict):
        return None
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    own = any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces if isinstance(ns, dict))
    return own, (spec.get("annotations") or {}).get(m.START_ON_CREATE_ANNOTATION) == "true", spec


def _is_sandbox(spec: dict[str, Any]) -> bool:
    annotations = spec.get("annotations")
    return isinstance(annotations, dict) and annotations.get(m.CONTAINER_TYPE_ANNOTATION) == "sandbox"


def _write_json(path: str, data: Any) -> None:
    _write_bytes(path, json.dumps(data).encode())


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _make_dirs(*paths: str) -> None:
    for p in paths:
        os.makedirs(p, mode=0o700, exist_ok=True)


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
