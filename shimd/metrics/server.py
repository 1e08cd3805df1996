"""HTTP endpoint for Prometheus: GET /metrics on [metrics] address (off when the address is empty)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shimd import errors, log, phases
from shimd.cri import dispatch
from shimd.metrics.registry import Metrics


class MetricsServer:
    def __init__(self, address: str, metrics: Metrics) -> None:
        self.address = address
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.port = 0  # the bound port (useful with port 0)
        self.log = log.get("metrics")

    async def _handle(self, request: web.Request) -> web.Response:
        # Rendering walks the store and every series; keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        if not self.address:
            return
        host, _, port = self.address.rpartition(":")
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise errors.Unavailable(f"metrics.address {self.address}: cannot listen: {e.strerror}") from None
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)
        self.log.info("serving metrics", address=f"{host}:{self.port}")

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.wait_for(self._runner.cleanup(), timeout=5)
            self._runner = None


async def start_for_daemon(address: str, store_of: Callable[[], Any]) -> MetricsServer:
    """Build the metric set, hook it into every CRI call, and serve it (no-op server when address is "")."""
    metrics = Metrics(store_of)
    dispatch.add_observer(metrics.observe_rpc)
    phases.add_observer(metrics.observe_phases)
    server = MetricsServer(address, metrics)
    await server.start()
    return server
