"""The pod's pause task started by the shim itself, without a runc process.

A pod whose containers share one PID namespace needs a process that owns it (catatonit as PID 1).
Its spec, written by shimd, asks for very little: a new PID and mount namespace, the pod's pinned
network, IPC and UTS namespaces, a read-only rootfs holding one binary, an unprivileged user, no
capabilities, no new privileges, a cgroup. `runc run` spends ~50-60 ms of RunPodSandbox on that
(measured on the 2-core CI machine: `sandbox_create` phase p50 58 ms under the 20-pod benchmark); a
fork of the shim does the same in a few ms. Any spec asking for more (a user namespace, seccomp,
hooks, a systemd cgroup, a terminal) goes to runc as before: see `plan`.

The process is the shim's child (the shim reaps it) and dies with the shim (parent-death signal),
as the tasks of a dead shim are force-deleted by shimd anyway.

What the process ends up with, checked by tests/integration/test_pause_task.py: PID 1 of a new PID
namespace; a mount namespace of its own whose only mount is its rootfs, read-only (so no container
reaches the host's files through /proc/1/root, even with CAP_SYS_PTRACE); the spec's uid and gid,
no supplementary groups; empty capability sets including bounding and inheritable; no_new_privs.
"""

from __future__ import annotations

import ctypes
import os
import signal

from shimproto.messages import CONTAINER_TYPE_ANNOTATION
from shims.common import aio
from shims.common.procs import Reaper
from shims.runc import cgroupfs
from shims.runc.runc import Runc, RuncError, RuncOptions

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV = 0x1, 0x2, 0x4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NAME, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 15, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# The namespaces it joins by path (pinned by shimd), in the order they are joined.
JOINED = ("network", "ipc", "uts")
# What the spec may carry beside what is done here. Its /proc and /dev mounts are not made: catatonit
# opens no file, and a proc mount would only be one more way into the pod's PID namespace.
_SPEC_MOUNTS = {"/proc", "/dev"}
_START_TIMEOUT = 10.0
# Written by the child once it is set up, before it joins its cgroups and execs; any text after it is
# a failure of those two steps.
READY = b"\0"
# Its name from the fork on (the exec gives it the binary's): made before any fork.
_NAME = ctypes.create_string_buffer(b"pause")


class PausePlan:
    """What to make, read from the spec (a plain class: dataclasses would cost every shim memory)."""

    def __init__(self, args: list[str], env: list[str], uid: int, gid: int, groups: list[int], rootfs: str,
                 joined: dict[str, str], cgroups_path: str) -> None:
        self.args, self.env, self.uid, self.gid, self.groups = args, env, uid, gid, groups
        self.rootfs, self.joined, self.cgroups_path = rootfs, joined, cgroups_path


def plan(spec: Any, bundle: str, opts: RuncOptions) -> PausePlan | None:
    """The pause task to start without runc, or None when the spec asks for anything this module does not do."""
    try:
        return _plan(spec, bundle, opts)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _plan(spec: Any, bundle: str, opts: RuncOptions) -> PausePlan | None:
    if os.environ.get("SHIMD_RUNTIME_FLAVOR", "runc") != "runc" or opts.systemd_cgroup:
        return None
    if os.uname().machine not in SYS_PIVOT_ROOT:
        return None
    if (spec.get("annotations") or {}).get(CONTAINER_TYPE_ANNOTATION) != "sandbox":
        return None
    unknown = set(spec) - {"ociVersion", "process", "root", "mounts", "annotations", "linux", "hostname"}
    proc, linux, root = spec["process"], spec["linux"], spec["root"]
    if unknown or set(linux) - {"namespaces", "cgroupsPath", "resources", "maskedPaths", "readonlyPaths"}:
        return None
    caps = proc.get("capabilities") or {}
    if (proc.get("terminal") or not proc.get("noNewPrivileges") or any(caps.values())
            or set(proc) - {"terminal", "user", "args", "cwd", "env", "noNewPrivileges", "capabilities"}):
        return None
    user = proc["user"]
    # -1 would mean "unchanged" to setresuid/setresgid (the task would keep root): such ids go to runc.
    if set(user) - {"uid", "gid", "additionalGids"} or not all(
            isinstance(user.get(k), int) and 0 <= user[k] < 0xFFFFFFFF for k in ("uid", "gid")) or user["uid"] == 0:
        return None
    args = proc["args"]
    if not args or not all(isinstance(a, str) for a in args) or not args[0].startswith("/") or proc.get("cwd") != "/":
        return None
    if not root.get("readonly") or {m["destination"] for m in spec.get("mounts") or []} - _SPEC_MOUNTS:
        return None
    # Devices: the process has no /dev and no capability to make a node, so the deny-all rule adds nothing.
    if set(linux.get("resources") or {}) - {"devices"}:
        return None
    joined: dict[str, str] = {}
    own: set[str] = set()
    for ns in linux["namespaces"]:
        kind, path = ns["type"], ns.get("path", "")
        if kind in JOINED and path:
            joined[kind] = path
        elif kind in ("pid", "mount") and not path:
            own.add(kind)
        else:
            return None  # a user or cgroup namespace, or a PID namespace to join: runc's work
    cgroups_path = linux.get("cgroupsPath", "")
    # A path naming no cgroup of its own ("/") would put the task in the hierarchy's root, and Delete would
    # remove the empty cgroups under it.
    if own != {"pid", "mount"} or not cgroups_path.startswith("/") or ".." in cgroups_path.split("/") \
            or not cgroups_path.strip("/.") or "." in cgroups_path.split("/"):
        return None
    rootfs = root["path"] if root["path"].startswith("/") else os.path.join(bundle, root["path"])
    groups = [int(g) for g in user.get("additionalGids") or []]
    return PausePlan(list(args), [str(e) for e in proc.get("env") or []], user["uid"], int(user["gid"]), groups,
                     rootfs, joined, cgroups_path)


def _cgroup_mounts() -> list[tuple[str, bool]]:
    """(mount point, is the cpuset hierarchy) of every cgroup v1 controller hierarchy, name=systemd and
    cgroup2: those shimd removes a pod's cgroups from (shimd/cgroups.py, hierarchy_roots)."""
    return [(point, kind == "cgroup" and "cpuset" in options) for point, kind, options in cgroupfs.mounts()
            if not any(o.startswith("name=") and o != "name=systemd" for o in options)]


def _cgroup_leaves(mounts: list[tuple[str, bool]], cgroups_path: str) -> list[tuple[str, bool]]:
    """The cgroup's directory in every hierarchy, and whether it is the cpuset one."""
    rel = cgroups_path.strip("/")
    return [(os.path.join(mount_point, rel), is_cpuset) for mount_point, is_cpuset in mounts]


def _open_cgroups(leaves: list[tuple[str, bool]]) -> list[int]:
    """Makes each leaf with its parents (a cpuset level gets its parent's cpus and mems: an empty cpuset
    takes no process); returns its cgroup.procs opened for writing. In the child, before pivot_root."""
    fds: list[int] = []
    for leaf, is_cpuset in leaves:
        missing: list[str] = []
        path = leaf
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            if is_cpuset:
                for name in ("cpuset.cpus", "cpuset.mems"):
                    with open(os.path.join(os.path.dirname(path), name)) as src:
                        value = src.read().strip()
                    with open(os.path.join(path, name), "w") as dst:
                        dst.write(value)
        fds.append(os.open(os.path.join(leaf, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
    return fds


class _Libc:
    """The few libc calls the child makes, looked up before fork (the child must not load anything)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.unshare, self.setns, self.mount, self.umount2 = libc.unshare, libc.setns, libc.mount, libc.umount2
        self.prctl, self.syscall, self.capset = libc.prctl, libc.syscall, libc.capset
        self.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        self.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(self, result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


_libc: _Libc | None = None
# Host facts read once per shim: the highest capability number, and the cgroup mounts.
_host: tuple[int, list[tuple[str, bool]]] | None = None


def _read_host() -> tuple[int, list[tuple[str, bool]]]:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read()), _cgroup_mounts()


def _child(p: PausePlan, libc: _Libc, stdio: tuple[int, int, int], lifeline: int, lifeline_w: int, report: int,
           leaves: list[tuple[str, bool]], last_cap: int) -> None:
    """In the forked child, PID 1 of the new PID namespace: becomes the pause process or reports why not."""
    step = "start"
    try:
        signal.set_wakeup_fd(-1)  # the shim's loop pipe: a signal here must not wake the shim
        # Our copy of the write end would keep the lifeline from ever reading EOF (the check below).
        os.close(lifeline_w)
        # Until its exec (after Create has answered) it would show as the shim in ps and top.
        libc.prctl(PR_SET_NAME, ctypes.addressof(_NAME), 0, 0, 0)
        step = "cgroups"
        cgroup_fds = _open_cgroups(leaves)
        for kind in JOINED:
            if kind in p.joined:
                step = f"join {kind} namespace {p.joined[kind]}"
                fd = os.open(p.joined[kind], os.O_RDONLY | os.O_CLOEXEC)
                libc.check(libc.setns(fd, 0), step)
                os.close(fd)
        step = "mount namespace"
        libc.check(libc.unshare(CLONE_NEWNS), step)
        libc.check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        root = p.rootfs.encode()
        libc.check(libc.mount(root, root, None, MS_BIND | MS_REC, None), "bind rootfs")
        libc.check(libc.mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None),
                   "read-only rootfs")
        step = "stdio"
        for target, fd in enumerate(stdio):
            if fd != target:
                os.dup2(fd, target)
        step = "pivot_root"
        os.chdir(p.rootfs)
        libc.check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), step)
        libc.check(libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")
        step = "capabilities"
        for cap in range(last_cap + 1):
            libc.check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
        step = "user"
        os.setgroups(p.groups)
        os.setresgid(p.gid, p.gid, p.gid)
        os.setresuid(p.uid, p.uid, p.uid)
        # The uid change cleared effective and permitted; inheritable is cleared here.
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()
        libc.check(libc.capset(header, data), "clear capabilities")
        libc.check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # Armed last: a change of uid or gid disarms it.
        step = "parent-death signal"
        libc.check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), step)
        try:  # the shim died before the signal was armed: nothing would ever stop this process
            if os.read(lifeline, 1) == b"":
                os._exit(1)
        except BlockingIOError:
            pass
        step = "exec"
        # Checked before READY, as this user in this root: a missing binary fails the Create, as with runc.
        if not os.access(p.args[0], os.X_OK):
            raise OSError(f"{p.args[0]} is not an executable file in the pause rootfs")
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        env = dict(e.split("=", 1) for e in p.env if "=" in e)
        os.write(report, READY)
        # The first move into a cgroup waits for an RCU grace period (10-30 ms measured on the 2-core
        # cgroup v1 CI host; the later ones 0.1 ms): the shim answers before it. The descriptors were
        # opened as root; the kernel checks the opener's credentials, and the process moves itself.
        step = "join cgroup"
        for fd in cgroup_fds:
            os.write(fd, b"0")
        step = "exec"
        os.execve(p.args[0], p.args, env)
    except BaseException as e:  # anything at all is reported, then the child ends
        try:
            os.write(report, f"pause task: {step}: {e}".encode(errors="replace")[:4000])
        except BaseException:
            pass
    finally:
        os._exit(127)


def _fork(p: PausePlan, libc: _Libc, stdio: tuple[int, int, int], lifeline: int, lifeline_w: int, report: int,
          leaves: list[tuple[str, bool]], last_cap: int) -> int:
    """fork() into a new PID namespace: the shim's next child is PID 1 of it, the shim's own namespace
    is restored for every later child (the setting is per thread, and this runs on the loop thread)."""
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc.check(libc.unshare(CLONE_NEWPID), "new PID namespace")
        try:
            pid = os.fork()
            if pid == 0:
                _child(p, libc, stdio, lifeline, lifeline_w, report, leaves, last_cap)
        finally:
            libc.check(libc.setns(own_pid_ns, CLONE_NEWPID), "restore the shim's PID namespace for children")
    finally:
        os.close(own_pid_ns)
    return pid


class PauseRuntime(Runc):
    """Stands in for runc for the pause task only (see the module's docstring)."""

    deletes_reaped_itself = False  # its own delete never involves runc
    signals_cgroup_itself = False  # PID 1 of its own namespace: signalled directly
    binary_keeps_state = False  # dies with its shim; shimd removes its cgroups then

    def __init__(self, reaper: Reaper, opts: RuncOptions, log_path: str, timeout: float, pause: PausePlan,
                 log: Any) -> None:
        super().__init__(reaper, opts, log_path, timeout)
        self.plan, self.log = pause, log
        self.pid = 0
        self._leaves: list[str] = []
        # Held open while the process lives: its read end, in the child, tells whether the shim was alive
        # when the parent-death signal was armed.
        self._lifeline = -1
        # What the child reports after READY (a failure to join a cgroup or to exec), read at delete.
        self._report_fd = -1
        self._reported = b""

    # Its cgroups are joined after Create has answered.
    moves_into_cgroups = False

    @property
    def label(self) -> str:
        return "shim"  # forked by this shim, no runc container

    def _refuse(self, what: str) -> RuncError:
        return RuncError(f"{what} is not supported for the pod's pause task")

    async def run_detached(self, cid: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
                           console_socket: str = "") -> None:
        global _libc, _host
        if console_socket:
            raise self._refuse("a terminal")
        if _host is None:
            _libc = _Libc()
            _host = await aio.to_thread(_read_host)  # type: ignore[assignment]
        assert _libc is not None and _host is not None
        last_cap, mounts = _host
        leaves = _cgroup_leaves(mounts, self.plan.cgroups_path)
        self._leaves = [leaf for leaf, _ in leaves]
        life_r, life_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            pid = _fork(self.plan, _libc, stdio, life_r, life_w, report_w, leaves, last_cap)
        except BaseException:
            for fd in (life_r, life_w, report_r, report_w):
                os.close(fd)
            raise
        self.pid, self._lifeline = pid, life_w
        os.close(life_r)
        os.close(report_w)
        self.reaper.watch(pid)
        try:
            async with aio.timeout(_START_TIMEOUT):
                first = await _read_some(report_r)
        except BaseException:
            os.close(report_r)
            self._kill()
            raise
        if not first.startswith(READY):
            os.close(report_r)
            self._kill()
            raise RuncError(first.decode(errors="replace") or "pause task: exited while starting")
        self._report_fd, self._reported = report_r, first[len(READY):]

    async def started_pid(self, pid_file: str) -> int:
        return self.pid  # known from the fork: no pid file to write and read back

    def _kill(self) -> bool:
        """SIGKILL while it is our unreaped child (its pid cannot be anyone else's); False: it is gone."""
        if not (self.pid and self.reaper.holds(self.pid)):
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def _log_reports(self) -> None:
        """What the child wrote after READY (it failed to join a cgroup or to exec), read once it has ended:
        the pipe then holds all of it."""
        text = self._reported
        while self._report_fd >= 0:
            try:
                chunk = os.read(self._report_fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            text += chunk
        self._close_reports()
        if text:
            self.log.error("pause task failed after its start", error=text.decode(errors="replace"))

    async def create(self, cid: str, bundle: str, pid_file: str, stdio: tuple[int, int, int],
                     console_socket: str = "") -> None:
        raise self._refuse("create without start")

    async def start(self, cid: str) -> None:
        raise self._refuse("start after create")

    async def exec(self, cid: str, process_file: str, pid_file: str, stdio: tuple[int, int, int],
                   console_socket: str = "") -> None:
        raise self._refuse("exec")

    async def state(self, cid: str) -> dict[str, Any]:
        alive = self.pid and self.reaper.holds(self.pid)
        return {"id": cid, "pid": self.pid, "status": "running" if alive else "stopped"}

    async def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        # PID 1 of its namespace: the kernel ends every process in it when this one dies.
        if not (self.pid and self.reaper.holds(self.pid)):
            raise RuncError("pause task: no such process")
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError:
            raise RuncError("pause task: no such process") from None

    async def delete(self, cid: str, force: bool = False) -> None:
        if self.pid and self.reaper.holds(self.pid):
            if not force:
                raise RuncError("pause task is running: cannot delete it")
            self._kill()
            async with aio.timeout(self.timeout):
                await self.reaper.watch(self.pid)
        self._log_reports()
        self.close()
        left = await aio.to_thread(cgroupfs.remove, self._leaves)
        if left:
            raise RuncError(f"pause task: cgroups still in use: {left}")

    async def pause(self, cid: str) -> None:
        raise self._refuse("pause")

    async def resume(self, cid: str) -> None:
        raise self._refuse("resume")

    async def update(self, cid: str, resources_json: bytes) -> None:
        raise self._refuse("update")

    async def ps(self, cid: str) -> list[int]:
        return [self.pid] if self.pid and self.reaper.holds(self.pid) else []

    checkpoint_unsupported = "checkpoint is not supported for the pod's pause task"

    def _close_reports(self) -> None:
        if self._report_fd >= 0:
            os.close(self._report_fd)
            self._report_fd = -1

    def close(self) -> None:
        self._close_reports()
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1


async def _read_some(fd: int) -> bytes:
    """What a non-blocking pipe holds once it is readable; b"" at its end."""
    while True:
        await aio.wait_fd(fd)
        try:
            return os.read(fd, 4096)
        except BlockingIOError:
            continue
