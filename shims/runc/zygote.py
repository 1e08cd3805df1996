"""The shim zygote: a process with the shim's code already imported that forks new shims on request.

An interpreter start-up and the shim's imports cost ~100 ms of CPU per pod; a fork of this process
costs a few milliseconds, and the forked shims share the zygote's imported pages copy-on-write.

Protocol, one request per connection on a unix socket: the client sends one JSON object
{"flags": {...}, "cwd": DIR, "env": {...}, "socket_path": PATH} with the shim's listening socket
attached (SCM_RIGHTS), or {"op": "stamp"} or {"op": "exit"}; the zygote answers one JSON line: {"pid": N},
{"stamp": S} or {"error": "..."}. Each shim is forked once, into a session of its own; the zygote
ignores SIGCHLD, so the kernel reaps a shim that ends before it, and a shim outliving the zygote is
orphaned to init like any containerd shim. (A double fork, which would orphan it at once, cost
another fork and the exit of a copy of the zygote: 1.5-1.7 ms of CPU per pod, measured from the
zygote's cutime+cstime over 60 pods.)

The zygote runs no event loop and no threads: forking from it is always safe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from shimproto.paths import LISTEN_FD_ENV
from shims.runc import pause as _pause  # noqa: F401  # pods sharing a PID namespace
from shims.runc import server as shim_server  # imported here so every fork has it
from shims.runsc import runtime as _runsc_runtime  # noqa: F401  # gVisor handlers use the same shim

STAMP_ENV = "SHIMD_ZYGOTE_STAMP"
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0
_M_ARENA_MAX = -8  # mallopt(3) parameter number


def _compact() -> None:
    """Shrink what every fork inherits: each resident page of the zygote is counted in each shim's RSS.

    gc.freeze() keeps the children's collector off the inherited objects (no copy-on-write of their
    pages); malloc_trim gives back the free heap the imports left; one malloc arena for all threads
    (inherited across fork) spares each shim's writer thread an arena of its own.
    """
    import ctypes
    import gc

    gc.collect()
    gc.freeze()
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_comm(name: str) -> None:
    """Forked shims share the zygote's command line; the thread name (ps, top) tells them apart."""
    import ctypes

    pr_set_name = 15
    try:
        ctypes.CDLL(None).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _become_shim(req: dict[str, object], listen_fd: int) -> None:
    """In the forked child: turn into the long-lived shim for one pod. Never returns."""
    code = 1
    try:
        os.chdir(str(req["cwd"]))
        os.environ.update({str(k): str(v) for k, v in dict(req.get("env") or {}).items()})  # type: ignore[call-overload]
        os.environ[LISTEN_FD_ENV] = str(listen_fd)
        socket_path = str(req["socket_path"])
        os.environ["SHIMD_SHIM_SOCKET"] = socket_path
        devnull = os.open(os.devnull, os.O_RDWR)
        errlog = os.open("shim.stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(errlog, 2)
        os.close(devnull)
        os.close(errlog)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _set_comm(f"shim-{str(dict(req['flags']).get('id', ''))[:10]}")  # type: ignore[call-overload]
        flags = {str(k): str(v) for k, v in dict(req["flags"]).items()}  # type: ignore[call-overload]
        code = shim_server.serve(flags, socket_path)
    except BaseException as e:  # nothing may escape back into the zygote's loop
        with_msg = f"shim zygote child failed: {type(e).__name__}: {e}\n"
        try:
            os.write(2, with_msg.encode())
        except OSError:
            pass
    os._exit(code)


def _spawn(req: dict[str, object], listen_fd: int, conn: socket.socket, zygote_sock: socket.socket) -> int:
    child = os.fork()
    if child == 0:
        zygote_sock.close()
        conn.close()
        os.setsid()
        _become_shim(req, listen_fd)
    os.close(listen_fd)
    return child


def _peer_gone(conn: socket.socket) -> bool:
    """True when the client has closed its end (it sends nothing after its request)."""
    import select

    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _handle(conn: socket.socket, zygote_sock: socket.socket, stamp: str) -> None:
    conn.settimeout(REQUEST_TIMEOUT)
    msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 1)
    try:
        req = json.loads(msg)
        if req.get("op") == "stamp":
            reply: dict[str, object] = {"stamp": stamp, "pid": os.getpid()}
        elif req.get("op") == "exit":
            conn.sendall(b'{"exiting": true}\n')
            raise SystemExit(0)
        elif len(fds) != 1:
            reply = {"error": "a shim request needs exactly one listening socket"}
        elif _peer_gone(conn):
            # shimd died after asking: its successor's recovery may already have torn the pod down, and
            # a shim forked now would belong to nothing.
            reply = {"error": "the requester hung up before the shim was forked"}
        else:
            reply = {"pid": _spawn(req, fds.pop(), conn, zygote_sock)}
    except (ValueError, KeyError, TypeError, OSError) as e:
        reply = {"error": f"{type(e).__name__}: {e}"}
    finally:
        for fd in fds:
            os.close(fd)
    conn.sendall(json.dumps(reply).encode() + b"\n")


def main(argv: list[str]) -> int:
    path = argv[0]
    # Whatever shimd leaked to us (uvloop does) would otherwise stay open for the zygote's lifetime.
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                pass
    stamp = os.environ.get(STAMP_ENV, "")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # shims are its children until it ends: never zombies
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    sock.bind(tmp)
    os.chmod(tmp, 0o600)
    sock.listen(64)
    os.replace(tmp, path)  # an older zygote's socket is replaced atomically; it exits when it notices
    _compact()
    mine = os.stat(path).st_ino
    while True:
        try:
            conn, _ = sock.accept()
        except InterruptedError:
            continue
        with conn:
            try:
                _handle(conn, sock, stamp)
            except OSError:
                pass
        try:
            if os.stat(path).st_ino != mine:
                return 0  # replaced by a newer zygote
        except FileNotFoundError:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
