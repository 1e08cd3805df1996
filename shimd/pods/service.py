"""Pod sandbox lifecycle: namespaces, network, pod files, the shim, and their orderly teardown.

Every step of RunPodSandbox is recorded before the next one starts, so a crash at any point
leaves a record that recovery can finish tearing down; a failed step undoes the earlier ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import betterproto

from shimd import cgroups, errors, events, fsutil, log, mounts, pod_limits, tasks
from shimd.api import dicts
from shimd.api.runtime import v1 as cri
from shimd.config import PAUSE_BINARY
from shimd.network import files as podfiles
from shimd.network import namespaces
from shimd.network.model import DnsSettings, PodNetworkRequest, PodNetworkResult, PortMapping, PreparedNetwork
from shimd.oci import spec as ocispec
from shimd.phases import phase, phase_context, side_branch
from shimd.pods.context import mapped_root_gid, pod_context, pod_dir, pod_hostname
from shimd.store.records import POD_INITIALIZING, POD_NOTREADY, POD_READY, POD_STOPPED, PodRecord

if TYPE_CHECKING:
    from shimd.containers.service import ContainerService
    from shimd.network.manager import NetworkManager
    from shimd.shimmgr.manager import ShimManager
    from shimd.store.store import Store

SHM_SIZE = "size=65536k"
# Characters of the pod id that name a pod whose metadata name is no hostname (CRI-O uses as many).
_PROTOCOLS = {cri.Protocol.TCP: "tcp", cri.Protocol.UDP: "udp", cri.Protocol.SCTP: "sctp"}
# Pod starts in their first step (first record and namespaces) at once; later ones wait in arrival
# order. Without a bound a burst of RunPodSandbox advances all its pods a step at a time through the one
# event loop, and none reaches its CNI ADD and shim (work the other cores can take) before all have done
# their first step: with 20 pods at once the machine was 62-72% busy in the first 100 ms, and 74-90%
# with three at a time (perf record -a, 6 bursts each on 2 cores).
FIRST_STEP_SLOTS = (os.cpu_count() or 1) + 1
# A stopped pod's namespaces that CNI DEL does not enter: removed by StopPodSandbox alongside the DEL.
UNNETWORKED_KINDS = ("ipc", "uts")


def pause_id(pod_id: str) -> str:
    return pod_id


async def _concurrently(*steps: Coroutine[Any, Any, None]) -> None:
    """Runs the steps at once and returns when all have ended, raising the first failure.

    Each step bounds its own waits. Cancelled, it cancels the steps and still waits for them (what
    they shield, a CNI chain, runs to its end), so nothing of the pod's teardown outlives the call
    that holds the pod's lock.
    """
    running = [asyncio.ensure_future(s) for s in steps]
    try:
        await asyncio.wait(running)
    except asyncio.CancelledError:
        for t in running:
            t.cancel()
        for t in running:
            await tasks.settle(t)
        raise
    for t in running:
        if t.exception() is not None:
            for other in running:
                if not other.cancelled():
                    other.exception()
            raise t.exception()  # type: ignore[misc]


class PodService:
    def __init__(self, *, cgroup_driver: str, state_dir: Path, store: Store, shims: ShimManager,
                 network: NetworkManager, containers: ContainerService, bus: events.EventBus) -> None:
        self.cgroup_driver = cgroup_driver
        self.state_dir = state_dir
        self.ns_dir = state_dir / "ns"
        self.store = store
        self.shims = shims
        self.network = network
        self.bus = bus
        self.containers = containers
        self.log = log.get("pods")
        self._first_steps = asyncio.Semaphore(FIRST_STEP_SLOTS)

    def pod_dir(self, pod_id: str) -> Path:
        return pod_dir(self.state_dir, pod_id)

    # --- pod-level resources ---------------------------------------------------------------------
    async def update_resources(self, pod_id: str, resources: cri.LinuxContainerResources | None,
                               overhead: cri.LinuxContainerResources | None) -> None:
        """Applied to the pod cgroup where shimd owns it (kubelet sizes its own), and persisted."""
        pod = self.store.pod(pod_id)
        async with self.store.lock(pod.id):
            pod = self.store.pod(pod.id)
            if not pod.ready:
                raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready")
            await self._apply_limits(pod, resources, overhead)

    async def _apply_limits(self, pod: PodRecord, resources: cri.LinuxContainerResources | None,
                            overhead: cri.LinuxContainerResources | None) -> None:
        written: dict[str, str] = {}
        if pod.owns_cgroup_parent:
            limits = pod_limits.combine(resources, overhead)
            rel = cgroups.relative_path(self.cgroup_driver, pod.cgroup_parent)
            written = await asyncio.to_thread(pod_limits.apply_sync, rel, limits)
        given = (("resources", resources), ("overhead", overhead))
        await self.store.update_pod(pod.id, resources={name: dicts.to_dict(r) for name, r in given if r is not None})
        self.log.info("pod resources updated", pod_id=pod.id, handler=pod.handler, cgroup_files=written)

    # --- run ---------------------------------------------------------------------------------
    async def run(self, config: cri.PodSandboxConfig, handler: str, userns: ocispec.IdMappings | None) -> str:
        """userns: the pod's own user namespace as the CRI validation parsed it (None: the host's)."""
        phase("validate")
        async with self._first_step_slot() as first_step_done:
            phase("queue")
            return await self._run(config, handler, userns, first_step_done)

    @contextlib.asynccontextmanager
    async def _first_step_slot(self) -> AsyncIterator[Callable[[], None]]:
        """One of FIRST_STEP_SLOTS, held until the returned function is called or the block ends."""
        await self._first_steps.acquire()
        held = True

        def done() -> None:
            nonlocal held
            if held:
                held = False
                self._first_steps.release()

        try:
            yield done
        finally:
            done()

    async def _run(self, config: cri.PodSandboxConfig, handler: str, userns: ocispec.IdMappings | None,
                   first_step_done: Callable[[], None]) -> str:
        md = config.metadata
        linux = config.linux if betterproto.serialized_on_wire(config.linux) else cri.LinuxPodSandboxConfig()
        # Message fields are never None (an unset one reads as its default); `or` would call the message's
        # __bool__, which builds a default of every field to compare with: ~2% of shimd's CPU per pod.
        sc = linux.security_context
        ns_opts = sc.namespace_options
        host_network = ns_opts.network == cri.NamespaceMode.NODE
        handler_name = self.shims.runtimes.name(handler)
        drv = self.shims.runtimes.get(handler_name)  # unknown/unusable handler fails before anything is made
        if userns is not None and not drv.supports_user_namespaces:
            raise errors.InvalidArgument(f"{ocispec.POD_USERNS_FIELD}: runtime handler {handler_name!r} "
                                         f"({drv.handler.driver}) does not support user namespaces")

        pod_id = secrets.token_hex(32)
        phase_context(pod_id=pod_id)
        # Known before CNI ADD: the bandwidth and other plugins receive it as the cgroupPath capability.
        owns_cgroup_parent = not linux.cgroup_parent
        pod = PodRecord(
            id=pod_id, name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt, handler=handler_name,
            created_at=time.time_ns(), config=dicts.to_dict(config), labels=dict(config.labels),
            annotations=dict(config.annotations), state=POD_INITIALIZING, host_network=host_network,
            cgroup_parent=(cgroups.default_pod_parent(self.cgroup_driver, pod_id) if owns_cgroup_parent
                           else linux.cgroup_parent),
            owns_cgroup_parent=owns_cgroup_parent,
        )
        self.store.reserve_name(pod.name_key, pod_id, "pod sandbox")
        lg = self.log.bind(pod_id=pod_id, handler=handler_name)
        # What setup has made so far, recorded with the READY state (a failed setup undoes it from here).
        made: dict[str, Any] = {}
        # Held while it is made: a Stop/Remove that finds it already (by listing) waits for the outcome.
        async with self.store.lock(pod_id):
            # CNI's own record (checked config, saved before ADD) is made alongside the pod's record and
            # namespaces: it needs neither, and recovery DELs a network record that names no pod.
            network = None if host_network else asyncio.ensure_future(self._prepare_network(pod, config))
            try:
                # The pod's first record and its namespaces at once: recover() removes pins no record names.
                await _concurrently(self.store.add_pod(pod), self._make_namespaces(pod, made, sc, userns))
                phase("record_write")
                first_step_done()
                await self._setup(dataclasses.replace(pod, namespaces=made.get("namespaces", {})), made, config,
                                  userns, drv.needs_sandbox_task(ns_opts.pid == cri.NamespaceMode.POD), network)
                given = {name: getattr(linux, name) for name in ("resources", "overhead")
                         if betterproto.serialized_on_wire(getattr(linux, name))}
                if given:
                    await self._apply_limits(self.store.pod(pod_id), given.get("resources"), given.get("overhead"))
                    phase("pod_limits")
            except BaseException as e:
                lg.warning("pod setup failed, undoing", error=repr(e))
                if network is not None:
                    # Its record is written (or not) before the teardown looks for it; it is bounded by one
                    # file write and never cancelled half way.
                    await tasks.settle(network)
                with contextlib.suppress(Exception):
                    current = self.store.pods.get(pod_id, pod)
                    await asyncio.shield(self._teardown(dataclasses.replace(current, **made), remove=True))
                self.store.release_name(pod.name_key, pod_id)
                raise
        self.bus.publish(events.CREATED, pod_id, pod_id)
        self.bus.publish(events.STARTED, pod_id, pod_id)
        lg.info("pod ready", name=md.name, namespace=md.namespace, ip=made.get("ip", ""))
        return pod_id

    async def _setup(self, pod: PodRecord, made: dict[str, Any], config: cri.PodSandboxConfig,
                     userns: ocispec.IdMappings | None, sandbox_task: bool,
                     network: asyncio.Future[PreparedNetwork] | None) -> None:
        """Makes the pod's parts after its first record and namespaces, noting each in `made` (record fields)
        as soon as it exists."""
        pdir = self.pod_dir(pod.id)
        # The pause task's rootfs and the pod's files live here; the pod's mapped root must reach them.
        root = userns.host_root() if userns is not None else None
        await asyncio.to_thread(fsutil.private_dir_sync, pdir, root[1] if root is not None else None)
        hostname = pod_hostname(pod)

        # Only the first record is saved before the pod is ready: everything else a crash could leave
        # behind is found from the pod id alone (namespace pins, CNI's own records, the cgroup parent set
        # in run(), the shim's ./address file written before it is forked), and each save costs an fsync
        # on the pod start path. Namespaces and CNI's record are made before this record may exist:
        # recover() removes pins and CNI records that name no pod.
        early_sandbox_task = sandbox_task and not self.shims.runtimes.get(pod.handler).sandbox_task_needs_network

        async def shm() -> None:
            if "ipc" in pod.namespaces:
                with side_branch():
                    await self._mount_shm(pdir / "shm")
                    phase("shm_mount")

        async def launch() -> None:
            # As containerd does, a pod with a sandbox task starts its shim in that task's bundle: shim v2
            # binaries read config.json there (sandbox id grouping; Kata's sandbox-or-container choice).
            shim_dir = await self._prepare_sandbox_bundle(pod) if sandbox_task else pdir
            made["shim_address"] = await self.shims.launch(pod.id, pod.handler, shim_dir)
            phase("shim_launch")

        async def start_shim() -> None:
            # The shim needs nothing of /dev/shm; the sandbox task (and every container) mounts it.
            await _concurrently(shm(), launch())
            if early_sandbox_task:
                # It joins the pinned namespaces and reads no pod file: it needs nothing from CNI ADD.
                await self._start_sandbox_task(pod, made)

        # CNI ADD and the shim's launch (with the sandbox task) need nothing from each other (the netns
        # exists already), so they run at once; a failure of either still lets the other finish, and
        # run() then undoes both.
        added: list[tuple[PreparedNetwork, PodNetworkResult]] = []
        await _concurrently(start_shim(), self._setup_network(pod, made, network, added))
        phase("cni_wait")

        dns = self._dns(config)
        files = {
            "resolv.conf": podfiles.resolv_conf(dns, pod.host_network),
            "hosts": podfiles.hosts_file(made.get("ip") or None, hostname, pod.host_network),
            "hostname": podfiles.hostname_file(hostname),
        }

        async def pod_files() -> None:
            with side_branch():
                await asyncio.to_thread(_write_pod_files, pdir, files)
                phase("pod_files")

        async def network_result() -> None:
            if added:
                with side_branch():
                    await self.network.save_result(*added[0])
                    phase("cni_record")

        async def ready() -> None:
            await self.store.update_pod(pod.id, state=POD_READY, **made)

        # The last three writes need nothing from each other: the pod files are made again from the record,
        # and DEL needs nothing of the ADD's result (save_result), so the record may say READY first.
        if sandbox_task and not early_sandbox_task:
            await _concurrently(pod_files(), network_result())  # runsc and Kata sandboxes mount the pod files
            await self._start_sandbox_task(pod, made)
            await ready()
        else:
            await _concurrently(pod_files(), network_result(), ready())
        phase("record_write")

    async def _make_namespaces(self, pod: PodRecord, made: dict[str, Any], sc: cri.LinuxSandboxSecurityContext,
                               userns: ocispec.IdMappings | None) -> None:
        ns_opts = sc.namespace_options
        kinds = [] if pod.host_network else ["network", "uts"]
        if ns_opts.ipc != cri.NamespaceMode.NODE:
            kinds.append("ipc")
        if not kinds:
            return
        with side_branch():
            # A user namespace is pinned with the others (namespaces["user"]) and removed with them.
            made["namespaces"] = await namespaces.create_pod_namespaces(pod.id, self.ns_dir, kinds, pod_hostname(pod),
                                                                        userns)
            phase("namespaces")

    async def _prepare_network(self, pod: PodRecord, config: cri.PodSandboxConfig) -> PreparedNetwork:
        with side_branch():
            return await self.network.prepare(PodNetworkRequest(
                pod_id=pod.id, name=pod.name, namespace=pod.namespace, uid=pod.uid,
                netns_path=namespaces.pin_path(self.ns_dir, pod.id, "network"),
                port_mappings=[PortMapping(protocol=_PROTOCOLS.get(p.protocol, "tcp"),
                                           container_port=p.container_port, host_port=p.host_port,
                                           host_ip=p.host_ip) for p in config.port_mappings],
                annotations=dict(config.annotations), cgroup_parent=pod.cgroup_parent,
                dns=self._dns(config),
            ))

    async def _setup_network(self, pod: PodRecord, made: dict[str, Any],
                             network: asyncio.Future[PreparedNetwork] | None,
                             added: list[tuple[PreparedNetwork, PodNetworkResult]]) -> None:
        if network is None:
            return
        with side_branch():
            prepared = await network
            if prepared.record["netns"] != pod.namespaces["network"]:
                raise errors.ShimdError(f"pod {pod.id}: CNI was prepared for {prepared.record['netns']!r}, "
                                        f"the network namespace is {pod.namespaces['network']!r}")
            result = await self.network.add(prepared)
            made.update(network_attached=True, ip=result.ip, additional_ips=list(result.additional_ips))
            added.append((prepared, result))

    @staticmethod
    def _dns(config: cri.PodSandboxConfig) -> DnsSettings | None:
        if not betterproto.serialized_on_wire(config.dns_config):
            return None
        d = config.dns_config
        return DnsSettings(servers=list(d.servers), searches=list(d.searches), options=list(d.options))

    async def _mount_shm(self, path: Path) -> None:
        await mounts.mount_tmpfs(path, f"nosuid,nodev,noexec,mode=1777,{SHM_SIZE}")

    async def _prepare_sandbox_bundle(self, pod: PodRecord) -> Path:
        """The pause task's bundle (rootfs with catatonit, config.json); returns its directory."""
        bundle = self.pod_dir(pod.id) / "pause"
        rootfs = bundle / "rootfs"

        def prepare() -> None:
            rootfs.mkdir(parents=True, exist_ok=True)
            # Mount points made here, as host root: in a pod user namespace runc could not create them.
            for mountpoint in ("proc", "dev"):
                (rootfs / mountpoint).mkdir(exist_ok=True)
            try:
                os.link(self._pause_binary_sync(), rootfs / "pause")
            except FileExistsError:
                pass
            except OSError:  # another filesystem
                shutil.copy2(PAUSE_BINARY, rootfs / "pause")

        ctx = pod_context(pod, self.state_dir)
        ctx.cgroups_path = cgroups.container_path(self.cgroup_driver, pod.cgroup_parent, pod.id)
        spec = fsutil.json_bytes(ocispec.pause_spec(ctx, str(rootfs), ["/pause", "-P"]))

        def prepare_and_write() -> None:  # one thread hop for both
            prepare()
            fsutil.write_atomic_sync(bundle / "config.json", spec, durable=False)  # daemon.state: no fsync

        await asyncio.to_thread(prepare_and_write)
        phase("sandbox_bundle")
        return bundle

    def _pause_binary_sync(self) -> Path:
        """A copy of the pause binary on daemon.state's filesystem, for a hard link per pod (daemon.state is
        usually a tmpfs, where /usr/bin is not); renewed when the package's file changes."""
        copy = self.state_dir / "pause"
        source = os.stat(PAUSE_BINARY)
        try:
            st = os.stat(copy)
            if (st.st_size, st.st_mtime_ns) == (source.st_size, source.st_mtime_ns):
                return copy
        except FileNotFoundError:
            pass
        tmp = copy.with_name(f".pause.{secrets.token_hex(6)}")
        shutil.copy2(PAUSE_BINARY, tmp)
        os.replace(tmp, copy)
        return copy

    async def _start_sandbox_task(self, pod: PodRecord, made: dict[str, Any]) -> None:
        """A pause process (catatonit): owns a shared PID namespace, and is the sandbox for runsc and Kata."""
        bundle = self.pod_dir(pod.id) / "pause"
        pid = await self.shims.create(pod.id, pod.handler, pause_id(pod.id), bundle, [], ("", "", ""), False)
        phase("sandbox_create")
        await self.shims.start(pod.id, pause_id(pod.id))
        phase("sandbox_start")
        # Recorded with the pod's ready state: recovery tears an initializing pod down with its
        # unrecorded pause task anyway, so a save of its own would only cost an fsync.
        made.update(sandbox_task=True, sandbox_pid=pid)

    # --- stop / remove -----------------------------------------------------------------------
    async def stop(self, pod_id: str) -> None:
        try:
            pod = self.store.pod(pod_id)
        except errors.NotFound:
            return  # CRI: stopping an unknown (already removed) pod is fine
        async with self.store.lock(pod.id):
            await self._teardown(self.store.pod(pod.id), remove=False)

    async def remove(self, pod_id: str) -> None:
        try:
            pod = self.store.pod(pod_id)
        except errors.NotFound:
            return
        async with self.store.lock(pod.id):
            await self._teardown(self.store.pod(pod.id), remove=True)

    async def _change(self, pod: PodRecord, **fields: Any) -> PodRecord:
        """Records a change of the pod whose lock the caller holds; returns `pod` with it.

        `pod` may carry more than its record: a failed RunPodSandbox's teardown starts from what setup
        made (namespaces, shim, IP), none of which was recorded yet.
        """
        await self.store.update_pod(pod.id, **fields)
        return dataclasses.replace(pod, **fields)

    async def _teardown(self, pod: PodRecord, remove: bool) -> None:
        """Stop (and with remove, delete) everything the pod has; each step tolerates being done already."""
        lg = self.log.bind(pod_id=pod.id, handler=pod.handler)
        phase_context(pod_id=pod.id)
        phase("lock_wait")  # the callers hold the pod's lock
        if not pod.stopped:
            if pod.ready:
                pod = await self._change(pod, state=POD_NOTREADY)
                phase("record_write")
            # The CNI DEL needs nothing from the tasks and they nothing from it (the containers are
            # SIGKILLed), so it runs alongside; the pod counts as stopped only once both are done, and
            # a crash in between leaves it NOTREADY: the next Stop/Remove redoes both.
            undone: dict[str, Any] = {}

            async def stop_tasks() -> None:
                await self._stop_tasks(pod, undone, lg)
                # Nothing of the pod runs any more: while the DEL runs, its cgroups (one try) and the
                # namespaces CNI has no use for go now instead of in RemovePodSandbox, which repeats both.
                await _concurrently(self._remove_cgroups(pod, lg, attempts=1),
                                    self._remove_namespaces(pod, UNNETWORKED_KINDS))

            await _concurrently(stop_tasks(), self._teardown_network(pod, undone))
            phase("cni_wait")
            shm = self.pod_dir(pod.id) / "shm"
            await mounts.unmount(shm)
            phase("unmount")
            # An interrupted RunPodSandbox stays INITIALIZING until its record is deleted (lifecycle.py).
            pod = await self._change(pod, state=POD_INITIALIZING if pod.initializing else POD_STOPPED, **undone)
            phase("record_write")
            if pod.stopped:
                self.bus.publish(events.STOPPED, pod.id, pod.id)
                lg.info("pod stopped")
        if not remove:
            return

        async def remove_containers() -> None:
            await self.containers.remove_all(pod)
            phase("remove_containers")

        async def remove_pod_files() -> None:
            with side_branch():
                await mounts.unmount(self.pod_dir(pod.id) / "shm")
                phase("unmount")
                await fsutil.remove_tree(self.pod_dir(pod.id))
                phase("pod_files")

        # The pod's tasks are gone (stopped above, their shim shut down): what is left of it are separate
        # things, removed at once; the record goes last, so a crash in between repeats the removal.
        await _concurrently(remove_containers(), self._remove_namespaces(pod), self._remove_cgroups(pod, lg),
                            remove_pod_files())
        phase("remove_wait")
        await self.store.delete_pod(pod.id)
        phase("record_write")
        self.bus.publish(events.DELETED, pod.id, pod.id)
        lg.info("pod removed")

    async def _remove_namespaces(self, pod: PodRecord, kinds: Collection[str] | None = None) -> None:
        with side_branch():
            await namespaces.remove_pod_namespaces(pod.id, self.ns_dir, kinds)
            phase("namespaces")

    async def _remove_cgroups(self, pod: PodRecord, lg: Any, attempts: int = 20) -> None:
        """The pod's cgroup parent where shimd made it; what stays (busy) is logged when the last try fails."""
        if pod.owns_cgroup_parent:
            with side_branch():
                left = await cgroups.remove(cgroups.relative_path(self.cgroup_driver, pod.cgroup_parent), attempts)
                if left and attempts > 1:
                    lg.warning("cgroups left behind", paths=left)
                phase("cgroups")

    async def _stop_tasks(self, pod: PodRecord, undone: dict[str, Any], lg: Any) -> None:
        """The pod's containers, its sandbox task and its shim, stopped; `undone` gets the record fields."""
        await self.containers.stop_all(pod)
        phase("stop_containers")
        # A crash inside launch: the shim may be up though its address was never recorded.
        has_shim = bool(pod.shim_address) or await self._adopt_unrecorded_shim(pod)
        # An interrupted RunPodSandbox may have made the sandbox task without recording it.
        if pod.sandbox_task or (pod.initializing and has_shim):
            await self._stop_sandbox_task(pod)
            undone.update(sandbox_task=False, sandbox_pid=0)
        await self.shims.shutdown(pod.id)
        phase("shim_shutdown")
        # Also after an interrupted RunPodSandbox: a Create the shim was still running when shimd
        # died can leave a task that no record names; force-deleting by id finds it.
        if pod.initializing:
            # A shim forked for this pod that no record and no address file names cannot be asked to
            # stop; it would outlive the pod.
            strays = await self.shims.kill_strays(pod.id, self.pod_dir(pod.id))
            if strays:
                lg.warning("killed shims left by an interrupted RunPodSandbox", shim_pids=strays)
        if pod.shim_dead or pod.initializing:
            await self._cleanup_dead_shim(pod)
            phase("dead_shim_cleanup")
        undone["shim_address"] = ""

    async def _teardown_network(self, pod: PodRecord, undone: dict[str, Any]) -> None:
        # Not only when network_attached: a crash between CNI ADD and saving that flag leaves a
        # network record (and an IP) that only this DEL frees; without a record it is a no-op.
        if not (pod.network_attached or not pod.host_network):
            return
        with side_branch():
            await self.network.teardown(pod.id, pod.namespaces.get("network", ""))
            undone["network_attached"] = False
            phase("cni_record")

    def _secure_dirs(self, pods: list[PodRecord]) -> None:
        for pod in pods:
            pdir = self.pod_dir(pod.id)
            if pdir.is_dir():
                fsutil.private_dir_sync(pdir, mapped_root_gid(pod))

    async def _stand_in(self, pod_id: str) -> None:
        handler = self.shims.runtimes.name("")
        # Its shim is found through the address file the shim's start wrote, so its containers can be stopped.
        address = await self._address_file(pod_id)
        pod = PodRecord(id=pod_id, name=f"unreadable-{pod_id[:12]}", namespace="shimd-recovery", uid=pod_id,
                        attempt=0, handler=handler, created_at=time.time_ns(), config={}, state=POD_INITIALIZING,
                        cgroup_parent=cgroups.default_pod_parent(self.cgroup_driver, pod_id),
                        owns_cgroup_parent=True, shim_address=address)
        self.shims.remember(pod.id, pod.shim_address)
        self.store.reserve_name(pod.name_key, pod.id, "pod sandbox")
        await self.store.add_pod(pod)
        self.store.adopt_orphans(pod)
        self.log.warning("tearing down the pod of an unreadable record", pod_id=pod_id,
                         containers=len(self.store.pod_containers(pod_id)), shim_address=pod.shim_address)

    async def _address_file(self, pod_id: str) -> str:
        for d in (self.pod_dir(pod_id), self.pod_dir(pod_id) / "pause"):
            try:
                text = await asyncio.to_thread((d / "address").read_text)
            except OSError:
                continue
            if text.strip():
                return text.strip().removeprefix("unix://")
        return ""

    async def _adopt_unrecorded_shim(self, pod: PodRecord) -> bool:
        """Shims write their address to ./address in the directory they were started in."""
        address = await self._address_file(pod.id)
        if address:
            self.shims.remember(pod.id, address)
        return bool(address)

    async def _stop_sandbox_task(self, pod: PodRecord) -> None:
        if pod.shim_dead:
            return
        with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
            await self.shims.kill(pod.id, pause_id(pod.id), signal.SIGKILL, all_processes=True)
        phase("sandbox_kill")
        with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
            await self.shims.wait(pod.id, pause_id(pod.id), timeout=10.0)
        phase("sandbox_wait")
        with contextlib.suppress(errors.NotFound, errors.ShimdError, OSError, asyncio.TimeoutError):
            await self.shims.delete(pod.id, pause_id(pod.id))
        phase("sandbox_delete")

    async def _cleanup_dead_shim(self, pod: PodRecord) -> None:
        """runc state, mounts and cgroups that a dead shim could not clean up itself."""
        ids = [c.id for c in self.store.pod_containers(pod.id)] + [pause_id(pod.id)]
        bundles = [Path(c.bundle) for c in self.store.pod_containers(pod.id)] + [self.pod_dir(pod.id) / "pause"]
        with contextlib.suppress(errors.ShimdError):
            drv = self.shims.runtimes.configured(pod.handler)
            await drv.cleanup_after_dead_shim(ids, bundles)

    # --- shim death --------------------------------------------------------------------------
    async def shim_died(self, pod_id: str) -> None:
        # Under the pod's lock: a Stop/RemovePodSandbox racing with this must not find the runtime's
        # force-deletes below still running after it returns.
        async with self.store.lock(pod_id):
            pod = self.store.pods.get(pod_id)
            if pod is None or pod.shim_dead:
                return
            pod = await self._change(pod, shim_dead=True, state=POD_NOTREADY if pod.ready else pod.state)
            self.log.error("shim died", pod_id=pod_id)
            # As containerd does: with no shim to reap them, the tasks are force-deleted now, before they are
            # reported exited, so nothing keeps running that is listed as stopped (teardown repeats this).
            with contextlib.suppress(Exception):
                await self._cleanup_dead_shim(pod)
            for c in self.store.pod_containers(pod_id):
                await self.containers.mark_lost(c.id, "ShimDied", f"the shim of pod sandbox {pod_id} exited")

    # --- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        # A pod whose record could not be parsed still has what it owned (shim, pause task, namespaces, IP,
        # shm mount, cgroup): everything is found from the pod id, so it is torn down like an interrupted
        # RunPodSandbox, through a stand-in record that is saved first (a crash meanwhile repeats this).
        for pod_id in self.store.unreadable_pods:
            if pod_id not in self.store.pods:
                await self._stand_in(pod_id)
        # Pod directories made by a shimd that left them open to everyone (0755) are closed now.
        await asyncio.to_thread(self._secure_dirs, list(self.store.pods.values()))
        # CNI attachments recorded for pods shimd no longer knows (crash between ADD and the pod record).
        for pod_id in self.network.recorded_pods():
            if pod_id not in self.store.pods:
                with contextlib.suppress(errors.ShimdError):
                    await self.network.teardown(pod_id, "")
        # Namespaces pinned for pods shimd no longer knows (they are made alongside the pod's first record).
        for pod_id in await asyncio.to_thread(namespaces.pinned_pods, self.ns_dir):
            if pod_id not in self.store.pods:
                self.log.warning("removing namespaces of a pod without a record", pod_id=pod_id)
                with contextlib.suppress(errors.ShimdError, OSError):
                    await namespaces.remove_pod_namespaces(pod_id, self.ns_dir)
        for pod in list(self.store.pods.values()):
            if pod.initializing:
                self.log.warning("finishing teardown of a pod interrupted during creation", pod_id=pod.id)
                with contextlib.suppress(Exception):
                    await self._teardown(pod, remove=True)
                continue
            if pod.shim_address:
                self.shims.remember(pod.id, pod.shim_address)
                if pod.shim_dead:
                    # The cleanup after the shim's death may have been cut short by a crash; it is idempotent.
                    with contextlib.suppress(Exception):
                        await self._cleanup_dead_shim(pod)
                elif not await self.shims.shim_alive(pod.id):
                    await self.shim_died(pod.id)



def _write_pod_files(pdir: Path, files: dict[str, str]) -> None:
    """Plain writes: these files are regenerated from the pod record, so they need no fsync."""
    for name, text in files.items():
        tmp = pdir / f".{name}.tmp"
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pdir / name)
