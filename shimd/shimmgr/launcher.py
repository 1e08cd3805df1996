"""Starting (and cleaning up after) any containerd shim v2 binary, the way containerd does it.

`<shim> -namespace NS -address ADDR -publish-binary BIN -id ID start` runs in the bundle directory;
the shim daemonises and prints its ttrpc address. `... -bundle DIR delete` cleans up after a shim
that died and prints a DeleteResponse.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shimd import errors, log, subproc, tasks
from shimd.api.containerd.task import v2 as task
from shimd.fsutil import write_atomic_sync
from shimd.shimmgr.zygote import Zygote

_log = log.get("launcher")
# util-linux setsid -f: forks the shim into its own session and returns at once.
SETSID = shutil.which("setsid") or "/usr/bin/setsid"
# Events go nowhere: shimd watches exits with Wait, so publishing is a no-op binary.
PUBLISH_BINARY = shutil.which("true") or "/bin/true"
# An address or a DeleteResponse is a few hundred bytes; anything past this is noise.
MAX_OUTPUT = 1 << 20


def _argv(argv: list[str], namespace: str, task_id: str, shimd_address: str, extra: list[str]) -> list[str]:
    return [*argv, "-namespace", namespace, "-address", shimd_address, "-publish-binary", PUBLISH_BINARY,
            "-id", task_id, *extra]


async def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, what: str) -> bytes:
    # Output goes to temporary files, not pipes: a Go shim's daemonised child inherits whatever
    # descriptors leaked into `start` (uvloop leaks its stdio socketpair ends), so a pipe might never
    # reach EOF. The exit of the command is what ends the wait.
    out_f, err_f = await asyncio.to_thread(lambda: (tempfile.TemporaryFile(), tempfile.TemporaryFile()))
    try:
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, cwd=str(cwd), env={**os.environ, **env},
                                                        stdin=asyncio.subprocess.DEVNULL, stdout=out_f,
                                                        stderr=err_f)
        except OSError as e:
            raise errors.FailedPrecondition(f"{what}: cannot run shim {cmd[0]!r}: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await proc.wait()
            raise errors.DeadlineExceeded(f"{what}: shim {cmd[0]!r} did not finish within {timeout:g}s") from None
        out, err = await asyncio.to_thread(lambda: (_read_back(out_f), _read_back(err_f)))
    finally:
        out_f.close()
        err_f.close()
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()[-2000:] or f"exit status {proc.returncode}"
        raise errors.ShimdError(f"{what}: shim {cmd[0]!r} failed: {detail}")
    return out


def _read_back(f: IO[bytes]) -> bytes:
    f.seek(0)
    return f.read(MAX_OUTPUT)


def _prepare_bundle_sync(bundle: Path) -> None:
    # containerd's Go shims log to a "log" FIFO containerd creates in the bundle; without any
    # reader a FIFO would block them, so a plain file takes its place.
    log = bundle / "log"
    if not log.exists():
        log.touch(mode=0o600)


async def _prepare_bundle(bundle: Path) -> None:
    await asyncio.to_thread(_prepare_bundle_sync, bundle)


async def start_shim(argv: list[str], *, namespace: str, pod_id: str, shimd_address: str, bundle: Path,
                     env: dict[str, str], timeout: float) -> str:
    """Start (or find) the pod's shim; returns its ttrpc socket path."""
    await _prepare_bundle(bundle)
    out = await _run(_argv(argv, namespace, pod_id, shimd_address, ["start"]), bundle, env, timeout,
                     f"starting the shim of pod {pod_id}")
    lines = [ln.strip() for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise errors.ShimdError(f"starting the shim of pod {pod_id}: the shim printed no address")
    address = lines[-1]
    if address.startswith("unix://"):
        address = address[len("unix://"):]
    elif "://" in address:
        raise errors.ShimdError(f"starting the shim of pod {pod_id}: unsupported shim address {address!r}")
    return address


async def delete_shim(argv: list[str], *, namespace: str, task_id: str, shimd_address: str, bundle: Path,
                      env: dict[str, str], timeout: float) -> task.DeleteResponse:
    """Run the shim binary's `delete` for one task whose shim is gone (containerd's cleanup path)."""
    out = await _run(_argv(argv, namespace, task_id, shimd_address, ["-bundle", str(bundle), "delete"]), bundle,
                     env, timeout, f"cleaning up task {task_id}")
    return task.DeleteResponse().parse(out)


@dataclass
class DirectLaunch:
    argv: list[str]  # the long-lived shim itself
    env: dict[str, str]
    socket_path: str
    listen_fd_env: str  # names the variable that tells the shim which descriptor is its listening socket
    flags: dict[str, str]  # the shim's command-line flags, for a zygote that forks it instead
    # The shim forks itself off and its first process exits at once (the compiled shim's `-detach`): it is
    # spawned with vfork instead of through `setsid -f` (measured here from a 60 MiB uvloop process:
    # 5.5 ms of CPU and wall per launch through setsid, 0.85 ms with a vfork spawn and a pidfd).
    detaches_itself: bool = False


async def spawn_serving(launch: DirectLaunch, *, bundle: Path, timeout: float, zygote: Zygote | None = None) -> str:
    """Start a shim that serves on a socket bound here, without a `start` round trip (which costs a
    whole extra interpreter start-up per pod).

    The socket is bound and listening before the shim exists, so callers can connect at once (the
    kernel queues them until the shim accepts). `setsid -f` forks the shim off and returns, so the
    shim is orphaned to init like a containerd shim and never becomes shimd's zombie.
    """
    argv, env, socket_path, listen_fd_env = launch.argv, launch.env, launch.socket_path, launch.listen_fd_env
    address = f"unix://{socket_path}"

    def bind() -> socket.socket:
        os.makedirs(os.path.dirname(socket_path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_path)
            os.chmod(socket_path, 0o600)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock

    def prepare() -> tuple[socket.socket, int]:
        """Everything before the spawn in one thread hop (each costs ~70 us of CPU on a busy loop); the shim's
        stderr log is opened only when shimd spawns it (a zygote's child has its own)."""
        _prepare_bundle_sync(bundle)
        sock = bind()
        try:
            # Recorded before the shim exists: if shimd dies between the fork and its next step, the pod's
            # teardown still finds (and stops) the shim through this file; a shim that never started
            # just refuses the connection.
            _write_address_file(bundle, address)
            errlog = -1 if zygote is not None else _open_stderr_log(bundle)
        except BaseException:
            sock.close()
            _forget_socket(socket_path, bundle)
            raise
        return sock, errlog

    prepared = asyncio.ensure_future(asyncio.to_thread(prepare))
    try:
        sock, errlog = await asyncio.shield(prepared)
    except asyncio.CancelledError:
        # The thread goes on regardless: what it made must not outlive a cancelled launch.
        await tasks.settle(prepared)
        if not prepared.cancelled() and prepared.exception() is None:
            sock, errlog = prepared.result()
            sock.close()
            if errlog >= 0:
                os.close(errlog)
            _forget_socket(socket_path, bundle)
        raise
    if zygote is not None:
        try:
            await zygote.fork_shim(launch.flags, bundle, env, socket_path, sock.fileno())
        except (errors.ShimdError, OSError, TimeoutError) as e:
            _log.warning("shim zygote failed; starting the shim directly", error=str(e))
        else:
            sock.close()
            return socket_path
    try:
        if errlog < 0:  # the zygote failed: shimd spawns the shim itself
            errlog = await asyncio.to_thread(_open_stderr_log, bundle)
        if launch.detaches_itself:
            try:
                await _spawn_detaching(argv, bundle, {**os.environ, **env, listen_fd_env: str(sock.fileno()),
                                                      "SHIMD_SHIM_SOCKET": socket_path}, sock.fileno(), errlog,
                                       timeout)
            finally:
                os.close(errlog)
            return socket_path
        try:
            proc = await asyncio.create_subprocess_exec(
                SETSID, "-f", *argv, cwd=str(bundle), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=errlog, pass_fds=(sock.fileno(),),
                env={**os.environ, **env, listen_fd_env: str(sock.fileno()), "SHIMD_SHIM_SOCKET": socket_path})
        finally:
            os.close(errlog)
        try:
            async with asyncio.timeout(timeout):
                rc = await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise errors.DeadlineExceeded(f"launching the shim ({argv[-1]}) timed out after {timeout:g}s") from None
        if rc != 0:
            raise errors.ShimdError(f"launching the shim failed: setsid exited {rc}")
    except BaseException:
        _forget_socket(socket_path, bundle)
        raise
    finally:
        sock.close()  # the shim holds its own copy
    return socket_path


def _open_stderr_log(bundle: Path) -> int:
    """The file the shim's stderr goes to, opened for appending."""
    return os.open(str(bundle / "shim.stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


def _forget_socket(socket_path: str, bundle: Path) -> None:
    """A shim that was never spawned: no socket or address file may point a restarted shimd at it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(bundle / "address")


async def _spawn_detaching(argv: list[str], bundle: Path, env: dict[str, str], listen_fd: int, errlog: int,
                           timeout: float) -> None:
    """Spawn a shim that forks itself off (in a session of its own) and wait for its first process's exit."""
    try:
        # Popen vforks and returns once the child has exec'd; the exit is seen through a pidfd.
        proc = subprocess.Popen(argv, cwd=str(bundle), env=env, stdin=subprocess.DEVNULL,  # noqa: ASYNC220
                                stdout=subprocess.DEVNULL, stderr=errlog, pass_fds=(listen_fd,),
                                start_new_session=True)
    except OSError as e:
        raise errors.FailedPrecondition(f"launching the shim: cannot run {argv[0]!r}: {e.strerror or e}") from None
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not await subproc.wait_exit(pidfd, timeout):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await subproc.wait_exit(pidfd, subproc.KILL_GRACE)
            raise errors.DeadlineExceeded(f"launching the shim ({argv[0]}) timed out after {timeout:g}s")
    finally:
        proc.poll()
        os.close(pidfd)
    if proc.returncode != 0:
        raise errors.ShimdError(f"launching the shim failed: {argv[0]} exited {proc.returncode}")


def _write_address_file(bundle: Path, address: str) -> None:
    # Under daemon.state (gone with a reboot): no fsync, the rename makes it whole for a restarted shimd.
    write_atomic_sync(bundle / "address", address.encode(), 0o644, durable=False)
