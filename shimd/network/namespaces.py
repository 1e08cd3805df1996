"""Pod namespaces without an infra process: network/ipc/uts namespaces pinned by bind mounts.

Layout: <base_dir>/<pod_id>/<kind>, each an nsfs bind mount that keeps its namespace alive
until remove_pod_namespaces() unmounts it. Containers join them by path (OCI namespace "path").

A pod with a user namespace (hostUsers: false) has it pinned at <pod_id>/user too, and its other
namespaces are created inside it, so that it owns them: the kernel lets a container in that user
namespace mount proc, sysfs and mqueue only for namespaces its user namespace owns.

base_dir is made a shared bind mount of itself once (as `ip netns` does for /run/netns): mount
namespaces created later (container set-up, sandboxes, services) get *slave or peer* copies of the
pins, so our unmount propagates to them and a namespace is never kept alive by a forgotten copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from shimd import log, tasks
from shimd.errors import InvalidArgument, ShimdError
from shimd.network import proc

if TYPE_CHECKING:
    from shimd.oci.spec import IdMappings

# CRI/OCI kind name -> unshare(1) option / /proc/<pid>/ns entry.
KINDS: dict[str, str] = {"network": "net", "ipc": "ipc", "uts": "uts"}
CREATE_TIMEOUT = 15.0
USER = "user"  # the pin of a pod's user namespace, next to the KINDS pins
HOSTNAME_MAX = 64  # kernel __NEW_UTS_LEN

_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_CLONE_FLAGS = {"network": 0x40000000, "uts": 0x04000000, "ipc": 0x08000000}  # CLONE_NEWNET, NEWUTS, NEWIPC
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the 24-byte union

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_prepared: set[str] = set()
_prepare_lock = threading.Lock()  # runs in worker threads, so a thread lock, not an asyncio one
_log = log.get("network.namespaces")


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {source} on {target}: {os.strerror(e)}")


def _umount_all(target: str) -> None:
    """Lazily unmount every mount stacked on target; quiet when nothing (or nothing any more) is there."""
    for _ in range(16):
        if _libc.umount2(target.encode(), _MNT_DETACH) != 0:
            e = ctypes.get_errno()
            if e in (errno.EINVAL, errno.ENOENT):
                return
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def _mountpoints() -> set[str]:
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            field = line.split(" ", 5)[4]
            # mountinfo octal-escapes space, tab, newline and backslash.
            points.add(field.encode("latin-1", "surrogateescape").decode("unicode_escape"))
    return points


def _prepare_base(base_dir: Path) -> Path:
    """Create base_dir and make it a shared self bind mount, once per process and directory."""
    base_dir.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(base_dir)
    with _prepare_lock:
        if real in _prepared:
            return Path(real)
        os.chmod(real, 0o711)
        if real not in _mountpoints():  # after a shimd restart the bind mount is already there
            _mount(real, real, _MS_BIND | _MS_REC)
        _mount("none", real, _MS_SHARED | _MS_REC)
        _prepared.add(real)
    return Path(real)


def pin_path(base_dir: Path, pod_id: str, kind: str) -> str:
    """Where create_pod_namespaces pins a pod's namespace of `kind`, known before it is made."""
    _check_pod_id(pod_id)
    return os.path.join(os.path.realpath(base_dir), pod_id, kind)


def _check_pod_id(pod_id: str) -> None:
    if not pod_id or "/" in pod_id or pod_id in (".", "..") or "\0" in pod_id:
        raise InvalidArgument(f"pod id {pod_id!r} is not usable as a namespace directory name")


def _check_hostname(hostname: str) -> None:
    if len(hostname.encode()) > HOSTNAME_MAX or any(c in hostname for c in "\0\n"):
        raise InvalidArgument(f"hostname {hostname!r} is longer than {HOSTNAME_MAX} bytes or has control characters")


def _make_targets(pod_dir: Path, paths: Iterable[str]) -> None:
    pod_dir.mkdir(mode=0o711, exist_ok=True)
    for p in paths:
        # O_EXCL: a pod id is used once; an existing pin means a caller bug, not something to reuse.
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))


def _remove_dir(pod_dir: Path, kinds: Collection[str] | None = None) -> None:
    """The pins of `kinds` (all, and then the directory, by default)."""
    try:
        entries = list(os.scandir(pod_dir))
    except FileNotFoundError:
        return
    for entry in entries:
        if kinds is not None and entry.name not in kinds:
            continue
        _umount_all(entry.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
    if kinds is None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(pod_dir)


async def create_pod_namespaces(pod_id: str, base_dir: Path, kinds: Iterable[str], hostname: str,
                                userns: IdMappings | None = None) -> dict[str, str]:
    """Create and pin new namespaces of `kinds` for a pod; returns {kind: pinned path}.

    With userns, a user namespace with those mappings is created and pinned as "user" too, and the
    other namespaces are created inside it. In a new network namespace `lo` is brought up; in a new
    UTS namespace the hostname is set (an empty hostname keeps the host's). On any failure or
    cancellation nothing is left behind.
    """
    wanted = sorted(set(kinds))
    unknown = [k for k in wanted if k not in KINDS]
    if unknown:
        raise InvalidArgument(f"namespace kinds {unknown} are not supported (only {', '.join(KINDS)})")
    _check_pod_id(pod_id)
    _check_hostname(hostname)
    if not wanted:
        if userns is not None:
            raise InvalidArgument("a pod user namespace needs namespaces of its own to own")
        return {}
    logger = _log.bind(pod_id=pod_id)
    # The unresolved directory, for the clean-up: it is the same one the pins get (under the real base).
    pod_dir = Path(base_dir) / pod_id
    try:
        if userns is None:
            # One hop to a worker for all of it: under a burst of pods each hop waits its turn, and the
            # pod's CNI ADD waits for its network namespace.
            paths = await _through_cancellation(_create_pinned, Path(base_dir), pod_id, wanted, hostname)
        else:
            base = await asyncio.to_thread(_prepare_base, Path(base_dir))
            paths = {k: str(base / pod_id / k) for k in [*wanted, USER]}
            await _through_cancellation(_make_targets, base / pod_id, paths.values())
            await _create_in_userns(pod_id, paths, userns)
            await _set_up_inside(pod_id, paths, hostname)
            await asyncio.to_thread(_check_pinned, paths, pod_id)
    except FileExistsError:
        # Another sandbox owns these pins: leave them alone.
        raise ShimdError(f"namespaces for pod {pod_id} already exist under {pod_dir}") from None
    except BaseException:
        # Includes cancellation: the pins must not outlive a failed create.
        await asyncio.shield(asyncio.to_thread(_remove_dir, pod_dir))
        raise
    logger.debug("pod namespaces created", kinds=sorted(paths), dir=str(pod_dir))
    return paths


def _create_pinned(base_dir: Path, pod_id: str, kinds: list[str], hostname: str) -> dict[str, str]:
    """Blocking: the pins' directory, then the namespaces made and pinned by a thread of their own."""
    pod_dir = _prepare_base(base_dir) / pod_id
    paths = {k: str(pod_dir / k) for k in kinds}
    _make_targets(pod_dir, paths.values())
    _in_throwaway_thread(_pin_new_namespaces, paths, hostname, pod_id)
    _check_pinned(paths, pod_id)
    return paths


def _check_pinned(paths: dict[str, str], pod_id: str) -> None:
    dead = [k for k, p in paths.items() if not namespace_alive(p)]
    if dead:
        raise ShimdError(f"namespaces {dead} of pod {pod_id} were not pinned ({', '.join(paths.values())})")


def _inside_steps(paths: dict[str, str], hostname: str) -> str:
    """Shell steps run inside the new namespaces; the hostname travels as $1, never through the parser."""
    steps = []
    if "network" in paths:
        steps.append(f"{proc.which('ip')} link set lo up")
    if "uts" in paths and hostname:
        steps.append('printf %s "$1" > /proc/sys/kernel/hostname')
    return " && ".join(steps) or "true"


def _check_done(done: proc.Completed, what: str, pod_id: str) -> None:
    if done.returncode != 0:
        raise ShimdError(f"{what} for pod {pod_id} failed (exit {done.returncode}): "
                         f"{done.stderr.decode(errors='replace').strip()}")


async def _through_cancellation(fn: Callable[..., T], *args: object) -> T:
    """fn in a worker thread, waited for to its end even when the caller is cancelled (then re-raised): a
    thread cannot be stopped, and the clean-up after a cancellation must find every file and pin it made."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await tasks.settle(work)  # the cancellation is what the caller sees
        raise


def _in_throwaway_thread(fn: Callable[..., None], *args: object) -> None:
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=run, name="shimd-netns", daemon=True)
    t.start()
    t.join(CREATE_TIMEOUT)
    if t.is_alive():
        raise ShimdError(f"creating namespaces did not finish within {CREATE_TIMEOUT:g}s")
    if failed:
        raise failed[0]


def _pin_new_namespaces(paths: dict[str, str], hostname: str, pod_id: str) -> None:
    """Runs in a thread that ends right after: unshare, bring lo up, set the hostname, bind the pins.

    In a thread of our own rather than unshare(1) + sh + ip: three helper processes less on the pod start
    path. Network, UTS and IPC namespaces belong to a thread, so a new thread can unshare them, set itself
    up, pin them and end: nothing else in the daemon ever runs inside them.
    """
    flags = 0
    for kind in paths:
        flags |= _CLONE_FLAGS[kind]
    if _libc.unshare(flags) != 0:
        e = ctypes.get_errno()
        raise ShimdError(f"creating {', '.join(paths)} namespaces for pod {pod_id} failed: {os.strerror(e)}")
    try:
        if "uts" in paths and hostname:
            # Never the host's: only when this thread really is in a UTS namespace of its own.
            if os.stat("/proc/thread-self/ns/uts").st_ino == os.stat("/proc/self/ns/uts").st_ino:
                raise OSError(errno.EPERM, "the new UTS namespace is the host's")
            socket.sethostname(hostname)
        if "network" in paths:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a socket of the new namespace
                _, lo_flags = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))
                fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", lo_flags | _IFF_UP))
        for kind, path in paths.items():
            _mount(f"/proc/thread-self/ns/{KINDS[kind]}", path, _MS_BIND)
    except OSError as e:
        raise ShimdError(f"setting up the {', '.join(paths)} namespaces of pod {pod_id} failed: {e}") from None


async def _set_up_inside(pod_id: str, paths: dict[str, str], hostname: str) -> None:
    """From the host's user namespace, which may act in any namespace its descendants own."""
    joined = [f"--{KINDS[k]}={paths[k]}" for k in ("network", "uts") if k in paths]
    if not joined:
        return
    argv = [proc.which("nsenter"), *joined, "--", "/bin/sh", "-ec", _inside_steps(paths, hostname), "sh", hostname]
    _check_done(await proc.run(argv, time_limit=CREATE_TIMEOUT), "setting up the namespaces", pod_id)


async def _create_in_userns(pod_id: str, paths: dict[str, str], userns: IdMappings) -> None:
    """One unshare(2) makes the user namespace and, owned by it, the others; shimd maps and pins them.

    util-linux unshare cannot write arbitrary mappings without newuidmap, and a process whose uid is
    not mapped yet loses its capabilities on exec: so the holder only waits (cat on a pipe, which
    also ends it if shimd dies), while shimd writes its uid/gid maps and bind-mounts its namespaces.
    """
    flags = ["--user", *(f"--{KINDS[k]}" for k in paths if k in KINDS)]
    holder = await asyncio.create_subprocess_exec(
        proc.which("unshare"), *flags, "--", "cat", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    work = asyncio.ensure_future(asyncio.to_thread(_map_and_pin, holder.pid, paths, userns, CREATE_TIMEOUT))
    try:
        await asyncio.shield(work)
    finally:
        await asyncio.shield(_end_holder(holder))
        if not work.done():
            # Cancelled: the thread fails fast once its holder is gone; the caller removes pins only after it.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(work), CREATE_TIMEOUT)
    if holder.returncode not in (0, -9):
        err = (await holder.stderr.read()).decode(errors="replace").strip() if holder.stderr else ""
        raise ShimdError(f"the user namespace holder of pod {pod_id} failed (exit {holder.returncode}): {err}")


async def _end_holder(holder: asyncio.subprocess.Process) -> None:
    if holder.stdin is not None:
        holder.stdin.close()
    try:
        await asyncio.wait_for(holder.wait(), timeout=5)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        await asyncio.wait_for(holder.wait(), timeout=5)


def _map_and_pin(pid: int, paths: dict[str, str], userns: IdMappings, timeout: float) -> None:
    _wait_unshared(pid, timeout)
    for name, maps in (("uid_map", userns.uids), ("gid_map", userns.gids)):
        # One write(2), as the kernel requires; a privileged writer needs no setgroups "deny" first.
        text = "".join(f"{c} {h} {n}\n" for c, h, n in maps)
        with open(f"/proc/{pid}/{name}", "w", encoding="ascii") as f:
            f.write(text)
    for kind, path in paths.items():
        _mount(f"/proc/{pid}/ns/{KINDS.get(kind, kind)}", path, _MS_BIND)


def _wait_unshared(pid: int, timeout: float) -> None:
    """Until the holder is in its new user namespace (one unshare(2) made all of them at once)."""
    ours = os.stat("/proc/self/ns/user").st_ino
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.stat(f"/proc/{pid}/ns/user").st_ino != ours:
                return
        except FileNotFoundError:
            raise ShimdError(f"the user namespace holder {pid} exited before unsharing") from None
        if time.monotonic() > deadline:
            raise ShimdError(f"the user namespace holder {pid} did not unshare within {timeout:g}s")
        time.sleep(0.005)


def pinned_pods(base_dir: Path) -> list[str]:
    """The pod ids that have namespaces pinned under base_dir."""
    try:
        return sorted(e.name for e in os.scandir(base_dir) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


async def remove_pod_namespaces(pod_id: str, base_dir: Path, kinds: Collection[str] | None = None) -> None:
    """Unmount and remove a pod's pinned namespaces (only those of `kinds` when given); a no-op when they
    are already gone."""
    _check_pod_id(pod_id)
    await asyncio.to_thread(_remove_dir, Path(base_dir) / pod_id, kinds)


def release_base_dir(base_dir: Path) -> None:
    """Remove every pod's pins and the shared self bind mount of base_dir (tests, uninstall).

    Synchronous on purpose: fixtures and shutdown hooks call it outside any event loop.
    """
    real = os.path.realpath(base_dir)
    if os.path.isdir(real):
        for entry in os.scandir(real):
            if entry.is_dir(follow_symlinks=False):
                _remove_dir(Path(entry.path))
    with _prepare_lock:
        if real in _mountpoints():
            _umount_all(real)
        _prepared.discard(real)


def namespace_alive(path: str) -> bool:
    """True when path is an nsfs file (a pinned or /proc namespace) that still exists."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False
