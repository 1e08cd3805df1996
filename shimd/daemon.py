"""The shimd daemon: owns every component and the CRI gRPC server, from start to shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from pathlib import Path

import grpclib.server
import uvloop

from shimd import cgroups, config, errors, fsutil, log, malloc_tuning, sdnotify, state_fs
from shimd.containers.exec import Execs
from shimd.containers.service import ContainerService
from shimd.containers.streams import ContainerStreams
from shimd.cri import dispatch, grpc_server
from shimd.cri.deps import CriDeps
from shimd.cri.image_service import ImageService
from shimd.cri.runtime_service import RuntimeService
from shimd.events import EventBus
from shimd.images.manager import ImageManager
from shimd.metrics.server import MetricsServer
from shimd.metrics.server import start_for_daemon as start_metrics
from shimd.network.manager import NetworkManager
from shimd.pods.service import PodService
from shimd.runtimes.registry import Runtimes
from shimd.shimmgr.manager import ExitInfo, ShimManager
from shimd.socket_guard import SocketGuard
from shimd.stats.collector import StatsCollector
from shimd.store.store import Store
from shimd.streaming.server import StreamingServer
from shimd.tracing import Tracing
from shimd.tracing import configure as configure_tracing


class Daemon:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.log = log.get("daemon")
        self.root = Path(cfg.daemon.root)
        self.state = Path(cfg.daemon.state)
        self._server: grpclib.server.Server | None = None
        self._guard = SocketGuard(cfg.daemon.socket)
        self._stopping = asyncio.Event()
        self._trimmer: asyncio.Task[None] | None = None
        self.events = EventBus()
        # The components; start() makes them inside the running event loop.
        self.images: ImageManager = None  # type: ignore[assignment]
        self.store: Store = None  # type: ignore[assignment]
        self.network: NetworkManager = None  # type: ignore[assignment]
        self.shims: ShimManager = None  # type: ignore[assignment]
        self.pods: PodService = None  # type: ignore[assignment]
        self.containers: ContainerService = None  # type: ignore[assignment]
        self.execs: Execs = None  # type: ignore[assignment]
        self.streaming: StreamingServer | None = None
        self.stats: StatsCollector = None  # type: ignore[assignment]
        self.metrics: MetricsServer | None = None
        self.tracing: Tracing | None = None

    async def _build(self) -> None:
        self.images = ImageManager(self.cfg, self.root / "images")
        await self.images.start()
        self.store = Store(self.root)
        await self.store.load()
        self.images.set_in_use_check(self.store.image_in_use)
        # CNI records live with the IPAM store (which survives reboots), so they sit under root, not state.
        self.network = NetworkManager(self.cfg.cni, self.root / "network")
        self.runtimes = Runtimes(self.cfg, self.state)
        self.shims = ShimManager(self.cfg, self.state, self.runtimes, on_exit=self._on_exit,
                                 on_shim_dead=self._on_shim_dead)
        await self.runtimes.probe()
        self.stats = StatsCollector(self.store, self.cfg.daemon.cgroup_driver, sampler_for=self.runtimes.sampler_for)
        self.metrics = await start_metrics(self.cfg.metrics.address, lambda: self.store)
        # In a thread: with an endpoint configured, OpenTelemetry's SDK and exporter are imported now.
        self.tracing = await asyncio.to_thread(configure_tracing, self.cfg.tracing)
        dispatch.set_tracer(self.tracing.call_ended if self.tracing is not None else None)
        hugetlb = await asyncio.to_thread(cgroups.hugetlb_usable)
        # kubelet sends hugepage limits for every container; runc fails on them without the controller.
        self.log.info("hugetlb controller probed", usable=hugetlb,
                      hugepage_limits="applied" if hugetlb else "left out of OCI specs")
        self.containers = ContainerService(cgroup_driver=self.cfg.daemon.cgroup_driver, root_dir=self.root,
                                           state_dir=self.state, store=self.store, shims=self.shims,
                                           images=self.images, bus=self.events, hugetlb=hugetlb)
        self.pods = PodService(cgroup_driver=self.cfg.daemon.cgroup_driver, state_dir=self.state, store=self.store,
                               shims=self.shims, network=self.network, containers=self.containers, bus=self.events)
        self.execs = Execs(self.store, self.shims, self.state)
        self.streaming = StreamingServer(self.cfg.streaming, ContainerStreams(self.store, self.execs))
        await self.streaming.start()
        await self.pods.recover()
        await self.containers.recover()

    def _cri_deps(self) -> CriDeps:
        assert self.streaming is not None  # made by _build
        return CriDeps(cfg=self.cfg, store=self.store, pods=self.pods, containers=self.containers, images=self.images,
                       execs=self.execs, streaming=self.streaming, stats=self.stats, network=self.network,
                       events=self.events, metrics=self.metrics, handler_reports=self.runtimes.reports,
                       network_status=self.network.status)

    async def _on_exit(self, pod_id: str, task_id: str, info: ExitInfo) -> None:
        await self.containers.on_exit(pod_id, task_id, info)

    async def _on_shim_dead(self, pod_id: str) -> None:
        pod = self.store.pods.get(pod_id)
        if self.metrics is not None and pod is not None:
            self.metrics.metrics.record_shim_death(pod.handler)
        await self.pods.shim_died(pod_id)

    async def start(self) -> None:
        if self.cfg.daemon.state_tmpfs:
            # Before anything is made there (the socket's lock included): a mount would hide it.
            found = await asyncio.to_thread(state_fs.prepare_sync, self.state)
            self.log.info("daemon.state filesystem", state=str(self.state), tmpfs=found)
        for d in (self.root, self.state):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)
        # Image layers and writable layers keep setuid files and device nodes: no user may walk into them
        # (overlayfs and the shim reach them as root). Bundles and pod directories get their own modes.
        for d in (self.root / "images", self.root / "rw"):
            fsutil.private_dir_sync(d)
        for d in (self.state / "containers", self.state / "pods"):
            d.mkdir(mode=0o711, exist_ok=True)
            os.chmod(d, 0o711)
        self._guard.claim()
        try:
            await self._build()
            deps = self._cri_deps()
            limit = self.cfg.daemon.max_recv_message_size
            services = [dispatch.Wrapped(RuntimeService(deps), limit), dispatch.Wrapped(ImageService(deps), limit)]
            self._server = grpc_server.Server(services)
            await self._server.start_on(self._guard.bind())
        except BaseException:
            await self._close_components()
            self._guard.release()
            raise
        self.log.info("serving", socket=self.cfg.daemon.socket, config=self.cfg.source,
                      pods=len(self.store.pods), containers=len(self.store.containers))
        # What start-up built (modules, config, the loaded store) lives as long as the daemon: moved out
        # of the collector's sight, the collections that per-request garbage triggers stop walking it.
        gc.collect()
        gc.freeze()
        self._trimmer = asyncio.create_task(malloc_tuning.trim_periodically(), name="malloc-trim")
        # Only now is the socket accepting: kubelet ordered After=shimd.service may connect at once.
        sdnotify.ready(f"serving {len(self.store.pods)} pods on {self.cfg.daemon.socket}")

    async def _close_components(self) -> None:
        if self.metrics is not None:
            await self.metrics.close()
        if self.streaming is not None:
            await self.streaming.close()
        # Shims are deliberately left running: they outlive the daemon.
        if self.shims is not None:
            await self.shims.close()
        if self.shims is not None and self.store is not None and not self.store.pods:
            await self.runtimes.stop_zygote()  # no pod left: nothing to fork shims for until the next start
        if self.store is not None and not any(p.namespaces for p in self.store.pods.values()):
            # No pod pins a namespace: drop the shared bind mount of the pin directory too.
            from shimd.network.namespaces import release_base_dir

            await asyncio.to_thread(release_base_dir, self.state / "ns")
        if self.images is not None:
            await self.images.close()
        dispatch.set_tracer(None)
        if self.tracing is not None:
            await self.tracing.close()  # the last calls' spans are exported

    async def stop(self) -> None:
        sdnotify.stopping()
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
        await self._close_components()
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
    malloc_tuning.tune()
    daemon = Daemon(cfg)
    try:
        uvloop.run(daemon.serve())
    except errors.ShimdError as e:
        log.get("daemon").error("cannot start", error=str(e))
        return 1
    return 0
