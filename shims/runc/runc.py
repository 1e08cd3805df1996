"""The runc command line, as the shim uses it: one function per subcommand, no shell, bounded time."""

from __future__ import annotations

import contextlib
import json
import os

from shims.common import aio
from shims.common.procs import CommandError, ExitInfo, Reaper, run
from shims.runc import cgroup_kill, reaped_delete

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any


# Upper bound of one CRIU dump or restore; the ttrpc deadline of the call normally ends it sooner.
CRIU_TIMEOUT = 600.0


class RuncError(Exception):
    pass


class RuncOptions:
    # A plain class: importing dataclasses would cost the shim resident memory.
    def __init__(self, binary: str = "runc", root: str = "/run/containerd/runc/k8s.io") -> None:
        self.binary, self.root = binary, root
        self.systemd_cgroup = False
        self.no_pivot_root = False
        self.no_new_keyring = False


class Runc:
    # Whether create may be `run --detach` (made and started by one process) for a task that is
    # started right after its creation anyway; runsc keeps its own create/start split.
    runs_detached = True
    # Whether a task's pids are host processes this shim reaps, which it may signal itself.
    signals_directly = True
    # Whether creating a task moves a process into cgroups while the caller waits (cgroup_lock.py).
    moves_into_cgroups = True
    # Whether a container whose init the shim reaped may be deleted without a runc process when its spec
    # allows it (reaped_delete.py).
    deletes_reaped_itself = True
    # Whether a signal to every process of a container may be sent without a runc process when runc's
    # state allows it (cgroup_kill.py).
    signals_cgroup_itself = True
    # Whether the runtime binary keeps state of the task: `shim delete`, after a crash of the shim, cleans
    # it up with the binary and root it reads from the bundle's options.json.
    binary_keeps_state = True

    def __init__(self, reaper: Reaper, opts: RuncOptions, log_path: str, timeout: float) -> None:
        self.reaper, self.opts, self.log_path, self.timeout = reaper, opts, log_path, timeout

    @property
    def label(self) -> str:
        """What made the task, for the shim's log."""
        return self.opts.binary

    def watch_exit(self, cid: str, exec_id: str, pid: int) -> aio.Future[ExitInfo]:
        """How the process's exit is learnt (runsc overrides this: its pids are the sandbox's)."""
        return self.reaper.watch(pid)

    def close(self) -> None:
        """Stops any background work of this runtime (runsc's waiters)."""

    def _argv(self, *args: str) -> list[str]:
        argv = [self.opts.binary, "--root", self.opts.root, "--log", self.log_path, "--log-format", "json"]
        if self.opts.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv + list(args)

    def _last_error(self) -> str:
        """runc writes its errors to --log as JSON lines; the last error is the useful one."""
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                for line in reversed(f.read().splitlines()):
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if rec.get("level") in ("error", "fatal"):
                            return str(rec.get("msg", ""))
        return ""

    async def _run(self, *args: str, stdin_data: bytes | None = None, stdio: tuple[int, int, int] | None = None,
                   timeout: float = 0) -> bytes:
        try:
            _, out, _ = await run(self.reaper, self._argv(*args), timeout or self.timeout, stdin_data=stdin_data,
                                  stdio=stdio)
        except CommandError as e:
            detail = self._last_error() or e.stderr.strip() or f"exit status {e.status}"
            raise RuncError(f"runc {args[0]} failed: {detail}") from None
        return out

    async def create(self, cid: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
                     console_socket: str = "") -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file, *self._init_flags(console_socket)]
        await self._run(*args, cid, stdio=stdio)

    async def run_detached(self, cid: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
                           console_socket: str = "") -> None:
        """create + start in one runc process: one Go start-up and state load fewer than the pair."""
        args = ["run", "--detach", "--bundle", bundle, "--pid-file", pid_file, *self._init_flags(console_socket)]
        await self._run(*args, cid, stdio=stdio)

    async def started_pid(self, pid_file: str) -> int:
        """The pid of the process create, run, exec or restore just started: runc wrote it to pid_file."""
        return await aio.to_thread(_read_pid_file, pid_file)

    def _init_flags(self, console_socket: str) -> list[str]:
        """The flags create and restore share: both set up a container's init process from its bundle."""
        args: list[str] = []
        if console_socket:
            args += ["--console-socket", console_socket]
        if self.opts.no_pivot_root:
            args.append("--no-pivot")
        if self.opts.no_new_keyring:
            args.append("--no-new-keyring")
        return args

    async def start(self, cid: str) -> None:
        await self._run("start", cid)

    async def exec(self, cid: str, process_file: str, pid_file: str, stdio: tuple[int, int, int],
                   console_socket: str = "") -> None:
        args = ["exec", "--detach", "--process", process_file, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._run(*args, cid, stdio=stdio)

    async def state(self, cid: str) -> dict[str, Any]:
        return json.loads(await self._run("state", cid))  # type: ignore[no-any-return]

    async def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        await self._run("kill", *(["--all"] if all_processes else []), cid, str(signal))

    async def kill_all(self, cid: str, signal: int) -> str:
        """`kill --all` of a container of plain runc (cgroup_kill.py); returns "" or why runc had to do it."""
        why = await aio.to_thread(cgroup_kill.signal_all, self.opts.root, cid, signal)
        if why:
            await self.kill(cid, signal, True)
        return why

    async def delete(self, cid: str, force: bool = False) -> None:
        await self._run("delete", *(["--force"] if force else []), cid)

    async def delete_reaped(self, cid: str, own_pid_ns: bool) -> str:
        """`delete --force` of a container whose init the shim reaped and whose spec reaped_delete allows;
        returns "" or why runc had to do it after all."""
        why = await aio.to_thread(reaped_delete.remove, self.opts.root, cid, own_pid_ns)
        if why:
            await self.delete(cid, force=True)
        return why

    async def pause(self, cid: str) -> None:
        await self._run("pause", cid)

    async def resume(self, cid: str) -> None:
        await self._run("resume", cid)

    async def update(self, cid: str, resources_json: bytes) -> None:
        await self._run("update", "--resources", "-", cid, stdin_data=resources_json)

    async def ps(self, cid: str) -> list[int]:
        out = await self._run("ps", "--format", "json", cid)
        return [int(p) for p in (json.loads(out) or [])]

    # --- checkpoint/restore (CRIU) -----------------------------------------------------------------
    # Set by runtimes that cannot checkpoint one container: the reason, for a FAILED_PRECONDITION.
    checkpoint_unsupported = ""

    async def checkpoint(self, cid: str, image_path: str, work_path: str, leave_running: bool,
                         file_locks: bool = False) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path]
        if leave_running:
            args.append("--leave-running")
        if file_locks:
            args.append("--file-locks")
        try:
            # Dumping a large memory takes longer than any other runc command: the caller's deadline
            # (the CRI request's timeout, carried by the ttrpc call) is the real bound.
            await self._run(*args, cid, timeout=max(self.timeout, CRIU_TIMEOUT))
        except RuncError as e:
            raise RuncError(_with_criu_log(str(e), os.path.join(work_path, "dump.log"))) from None

    async def restore(self, cid: str, bundle: str, image_path: str, work_path: str, pid_file: str,
                      stdio: tuple[int, int, int], console_socket: str = "") -> None:
        """Recreates the container from CRIU images; runc hands its own stdio to the restored
        process in place of the pipes it had at dump time (descriptors.json in the images)."""
        args = ["restore", "--detach", "--bundle", bundle, "--image-path", image_path, "--work-path", work_path,
                "--pid-file", pid_file, *self._init_flags(console_socket)]
        try:
            await self._run(*args, cid, stdio=stdio, timeout=max(self.timeout, CRIU_TIMEOUT))
        except RuncError as e:
            raise RuncError(_with_criu_log(str(e), os.path.join(work_path, "restore.log"))) from None


def _read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def criu_errors(text: str, limit: int = 3) -> str:
    """The last few `Error (...)` lines of a CRIU log: runc itself only says "criu failed"."""
    lines = [ln[ln.index("Error"):].strip() for ln in text.splitlines() if "Error" in ln]
    return "; ".join(lines[-limit:])


def _with_criu_log(message: str, log_path: str) -> str:
    with contextlib.suppress(OSError):
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            found = criu_errors(f.read().decode(errors="replace"))
            if found:
                return f"{message}; {os.path.basename(log_path)}: {found}"
    return message
