"""The shimd daemon: owns every component and the CRI gRPC server, from start to shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import grpclib.server
import uvloop

from shimd import config, errors, log
from shimd.cri import dispatch
from shimd.cri.image_service import ImageService
from shimd.cri.runtime_service import RuntimeService
from shimd.socket_guard import SocketGuard


class Daemon:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.log = log.get("daemon")
        self.root = Path(cfg.daemon.root)
        self.state = Path(cfg.daemon.state)
        self._server: grpclib.server.Server | None = None
        self._guard = SocketGuard(cfg.daemon.socket)
        self._stopping = asyncio.Event()

    async def handler_reports(self) -> list[tuple[str, bool, str, bool]]:
        return [(name, True, "", False) for name in self.cfg.handlers]

    def network_status(self) -> tuple[bool, str, str]:
        return True, "", ""

    async def start(self) -> None:
        for d in (self.root, self.state):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)
        self._guard.claim()
        services = [dispatch.Wrapped(RuntimeService(self)), dispatch.Wrapped(ImageService(self))]
        self._server = grpclib.server.Server(services)
        await self._server.start(path=self.cfg.daemon.socket)
        self._guard.secure()
        self.log.info("serving", socket=self.cfg.daemon.socket, config=self.cfg.source)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
        # Shims are deliberately left running: they outlive the daemon.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.daemon.socket)
        self._guard.release()
        self.log.info("stopped")

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stopping.wait()
        finally:
            await self.stop()


def run(cfg: config.Config) -> int:
    log.configure(cfg.daemon.log_level)
    daemon = Daemon(cfg)
    try:
        uvloop.run(daemon.serve())
    except errors.ShimdError as e:
        log.get("daemon").error("cannot start", error=str(e))
        return 1
    return 0
