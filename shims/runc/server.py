"""The long-lived runc shim: subreaper, ttrpc server, task service; runs until Shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket

from shimproto.paths import LISTEN_FD_ENV
from shims.common import aio
from shims.common.jsonlog import Logger
from shims.common.procs import Reaper, set_subreaper, trim_memory
from shims.common.ttrpc_server import Server
from shims.common.writer import FileWriter
from shims.runc.service import TaskService


async def _main(flags: dict[str, str], path: str) -> int:
    log_path = os.path.join(os.getcwd(), "shim.log")
    writer = FileWriter()
    log = Logger(writer, log_path, debug=flags.get("debug") == "true", pod_id=flags["id"],
                 namespace=flags.get("namespace", ""))
    writer.set_error_handler(lambda path, e: log.error("log write failed", path=path, error=str(e)))
    set_subreaper()
    reaper = Reaper()
    reaper.install()
    stop = aio.Event()
    loop = aio.get_running_loop()
    # Terminal hang-ups and a dying parent must not end the shim; SIGTERM asks for an orderly exit.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    service = TaskService(flags.get("namespace", ""), flags["id"], os.path.dirname(path), reaper, writer, log,
                          stop.set)
    server = Server(service.services(), lambda what, e: log.error(what, error=f"{type(e).__name__}: {e}"))
    await server.listen(path, _inherited_listener())
    log.info("shim listening", address=f"unix://{path}", pid=os.getpid())
    trim_memory()
    try:
        await stop.wait()
    finally:
        await server.close()
        service.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        reaper.uninstall()
        log.info("shim exiting")
        writer.stop()
    return 0


def _inherited_listener() -> socket.socket | None:
    """The socket shimd bound for us (direct launch), or None when we bind the path ourselves."""
    fd = os.environ.pop(LISTEN_FD_ENV, "")
    if not fd.isdigit():
        return None
    # Handed over inheritable (pass_fds, SCM_RIGHTS): runc, runsc and hooks must not get our API socket.
    os.set_inheritable(int(fd), False)
    return socket.socket(fileno=int(fd))


def _close_stray_fds() -> None:
    """Descriptors our launcher leaked to us (uvloop does) would pin its sockets open for our lifetime."""
    keep = {0, 1, 2}
    fd = os.environ.get(LISTEN_FD_ENV, "")
    if fd.isdigit():
        keep.add(int(fd))
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n not in keep:
            with contextlib.suppress(OSError):
                os.close(n)


def serve(flags: dict[str, str], path: str) -> int:
    _close_stray_fds()
    return aio.run(_main(flags, path))  # type: ignore[return-value]
