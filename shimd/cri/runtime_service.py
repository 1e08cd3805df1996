"""runtime.v1.RuntimeService: validates CRI requests and hands them to the pod/container layer."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import betterproto

from shimd import errors, events
from shimd.api.runtime import v1 as cri
from shimd.cri import convert, runtime_info, validate, wire
from shimd.events import LifecycleEvent, SubscriberOverflow
from shimd.oci import spec as ocispec
from shimd.stats import cadvisor
from shimd.stats.collector import StatsCollector, container_cgroup, pod_cgroup
from shimd.store.records import CONTAINER_RUNNING, POD_READY, ContainerRecord, PodRecord

if TYPE_CHECKING:
    from shimd.daemon import Daemon


# Items per message of the Stream* RPCs.
STREAM_PAGE = 100
# Events a GetContainerEvents subscriber may lag behind before it is cut off (and reconnects).
EVENT_BUFFER = 1024
EVENT_IDLE = 30.0
POD_STATUS_MEMORY = 1024

_EVENT_TYPES = {
    events.CREATED: cri.ContainerEventType.CONTAINER_CREATED_EVENT,
    events.STARTED: cri.ContainerEventType.CONTAINER_STARTED_EVENT,
    events.STOPPED: cri.ContainerEventType.CONTAINER_STOPPED_EVENT,
    events.DELETED: cri.ContainerEventType.CONTAINER_DELETED_EVENT,
}

T = TypeVar("T")


def _spec_user(bundle: str) -> cri.ContainerUser | None:
    """process.user of the container's OCI spec: what kubelet reports as the effective uid/gid/groups."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            user = json.load(f)["process"]["user"]
        return cri.ContainerUser(linux=cri.LinuxContainerUser(
            uid=int(user["uid"]), gid=int(user["gid"]),
            supplemental_groups=[int(user["gid"]), *(int(g) for g in user.get("additionalGids") or [])]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pages(items: Sequence[T]) -> list[list[T]]:
    return [list(items[i:i + STREAM_PAGE]) for i in range(0, len(items), STREAM_PAGE)]


class RuntimeService(cri.RuntimeServiceBase):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        # A summary changes only with its record's state (pod labels and metadata are fixed at creation).
        self._pod_cache = wire.EncodingCache(convert.pod_summary, lambda p: p.state, lambda p: p.id)
        self._container_cache = wire.EncodingCache(convert.container_summary, lambda c: c.state, lambda c: c.id)
        # Last pod status seen per pod, so events about a removed pod still carry its metadata.
        self._last_pod_status: OrderedDict[str, cri.PodSandboxStatus] = OrderedDict()
        # The user each container's process runs as (from its OCI spec; fixed for the container's life).
        self._users: dict[str, cri.ContainerUser] = {}
        daemon.events.add_listener(self._remember_pod)

    # --- runtime ---------------------------------------------------------------------------
    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return runtime_info.version()

    async def status(self, status_request: cri.StatusRequest) -> cri.StatusResponse:
        return runtime_info.status(self.d.cfg, self.d.handler_reports(), self.d.network_status,
                                   status_request.verbose)

    async def runtime_config(self, runtime_config_request: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return runtime_info.runtime_config(self.d.cfg)

    async def update_runtime_config(self, request: cri.UpdateRuntimeConfigRequest) -> cri.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr if request.runtime_config else ""
        if cidr:
            self.d.network.set_pod_cidr(cidr)
        return cri.UpdateRuntimeConfigResponse()

    # --- pods ------------------------------------------------------------------------------
    async def run_pod_sandbox(self, request: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        config = validate.pod_config(request.config)
        self._check_pod_security(config)
        pod_id = await self.d.pods.run(config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    async def stop_pod_sandbox(self, request: cri.StopPodSandboxRequest) -> cri.StopPodSandboxResponse:
        await self.d.pods.stop(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(self, request: cri.RemovePodSandboxRequest) -> cri.RemovePodSandboxResponse:
        await self.d.pods.remove(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(self, request: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        await self._load_users(self.d.store.pod_containers(pod.id))
        statuses = [self._container_status(c) for c in self.d.store.pod_containers(pod.id)]
        return cri.PodSandboxStatusResponse(status=convert.pod_status(pod),
                                            info=convert.pod_info(pod) if request.verbose else {},
                                            containers_statuses=statuses, timestamp=time.time_ns())

    async def list_pod_sandbox(self, request: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        items = []
        for pod in self.d.store.pods.values():
            if pod.initializing:
                continue
            if f is not None:
                if f.id and not pod.id.startswith(f.id):
                    continue
                if betterproto.serialized_on_wire(f.state) and convert.pod_state(pod) != f.state.state:
                    continue
                if not convert.labels_match(pod.labels, f.label_selector):
                    continue
            items.append(self._pod_cache.encoded(pod))
        self._pod_cache.prune(self.d.store.pods)
        return wire.preencoded(cri.ListPodSandboxResponse, wire.repeated_message_field(1, items))

    # --- containers ------------------------------------------------------------------------
    async def create_container(self, request: cri.CreateContainerRequest) -> cri.CreateContainerResponse:
        validate.required_id(request.pod_sandbox_id, "pod_sandbox_id")
        config = validate.container_config(request.config)
        cid = await self.d.containers.create(request.pod_sandbox_id, config)
        return cri.CreateContainerResponse(container_id=cid)

    async def start_container(self, request: cri.StartContainerRequest) -> cri.StartContainerResponse:
        await self.d.containers.start(validate.required_id(request.container_id, "container_id"))
        return cri.StartContainerResponse()

    async def stop_container(self, request: cri.StopContainerRequest) -> cri.StopContainerResponse:
        await self.d.containers.stop(validate.required_id(request.container_id, "container_id"),
                                     validate.timeout(request.timeout, "timeout"))
        return cri.StopContainerResponse()

    async def remove_container(self, request: cri.RemoveContainerRequest) -> cri.RemoveContainerResponse:
        await self.d.containers.remove(validate.required_id(request.container_id, "container_id"))
        return cri.RemoveContainerResponse()

    async def container_status(self, request: cri.ContainerStatusRequest) -> cri.ContainerStatusResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        await self._load_users([ctr])
        return cri.ContainerStatusResponse(status=self._container_status(ctr),
                                           info=convert.container_info(ctr) if request.verbose else {})

    async def list_containers(self, request: cri.ListContainersRequest) -> cri.ListContainersResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        out = []
        for ctr in self.d.store.containers.values():
            if f is not None:
                if f.id and not ctr.id.startswith(f.id):
                    continue
                if f.pod_sandbox_id and not ctr.pod_id.startswith(f.pod_sandbox_id):
                    continue
                if betterproto.serialized_on_wire(f.state) and convert.container_state(ctr) != f.state.state:
                    continue
                if not convert.labels_match(ctr.labels, f.label_selector):
                    continue
            out.append(self._container_cache.encoded(ctr))
        self._container_cache.prune(self.d.store.containers)
        return wire.preencoded(cri.ListContainersResponse, wire.repeated_message_field(1, out))

    async def reopen_container_log(self, request: cri.ReopenContainerLogRequest) -> cri.ReopenContainerLogResponse:
        await self.d.containers.reopen_log(validate.required_id(request.container_id, "container_id"))
        return cri.ReopenContainerLogResponse()

    # --- exec and streaming -----------------------------------------------------------------
    async def exec_sync(self, request: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
        validate.required_id(request.container_id, "container_id")
        if not request.cmd:
            raise errors.InvalidArgument("cmd must not be empty")
        timeout = validate.timeout(request.timeout, "timeout")
        res = await self.d.execs.run_sync(request.container_id, list(request.cmd), float(timeout) if timeout else None)
        stderr = res.stderr
        if res.truncated:
            stderr += b"\n[shimd: output truncated at 16 MiB per stream]\n"
        return cri.ExecSyncResponse(stdout=res.stdout, stderr=stderr, exit_code=res.exit_code)

    async def exec(self, request: cri.ExecRequest) -> cri.ExecResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        if not request.cmd:
            raise errors.InvalidArgument("cmd must not be empty")
        if not (request.stdin or request.stdout or request.stderr):
            raise errors.InvalidArgument("one of stdin, stdout and stderr must be set")
        if request.tty and request.stderr:
            raise errors.InvalidArgument("stderr must be false when tty is set (the terminal merges it)")
        self._require_running(ctr)
        return cri.ExecResponse(url=self.d.streaming.exec_url(ctr.id, list(request.cmd), request.tty,
                                                              request.stdin, request.stdout, request.stderr))

    async def attach(self, request: cri.AttachRequest) -> cri.AttachResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        if not (request.stdin or request.stdout or request.stderr):
            raise errors.InvalidArgument("one of stdin, stdout and stderr must be set")
        if request.stdin:
            raise errors.FailedPrecondition("attach: stdin is not supported by shimd yet (output only)")
        self._require_running(ctr)
        return cri.AttachResponse(url=self.d.streaming.attach_url(ctr.id, request.tty, request.stdin,
                                                                  request.stdout, request.stderr))

    async def port_forward(self, request: cri.PortForwardRequest) -> cri.PortForwardResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        if pod.state != POD_READY:
            raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready")
        for i, port in enumerate(request.port):
            if not 0 < port < 65536:
                raise errors.InvalidArgument(f"port[{i}] {port} is out of range")
        return cri.PortForwardResponse(url=self.d.streaming.portforward_url(pod.id, list(request.port)))

    # --- security checks (issue 7) -----------------------------------------------------------
    @staticmethod
    def _check_pod_security(config: cri.PodSandboxConfig) -> None:
        """Refuse host-wide sysctls, or ones for a namespace the pod shares with the host, before making anything."""
        if not betterproto.serialized_on_wire(config.linux):
            return
        ns = config.linux.security_context.namespace_options
        private = set()
        if ns.network != cri.NamespaceMode.NODE:
            private |= {"network", "uts"}
        if ns.ipc != cri.NamespaceMode.NODE:
            private.add("ipc")
        ocispec.validate_sysctls(dict(config.linux.sysctls), private, "config.linux.sysctls")

    # --- stats and metrics (issue 7) ---------------------------------------------------------
    def _stats(self) -> StatsCollector:
        return self.d.stats

    def _stats_containers(self, f: cri.ContainerStatsFilter | None) -> list[ContainerRecord]:
        out = []
        for ctr in self.d.store.containers.values():
            if f is not None:
                if f.id and ctr.id != f.id:
                    continue
                if f.pod_sandbox_id and ctr.pod_id != f.pod_sandbox_id:
                    continue
                if not convert.labels_match(ctr.labels, f.label_selector):
                    continue
            out.append(ctr)
        return out

    def _stats_pods(self, f: cri.PodSandboxStatsFilter | None) -> list[PodRecord]:
        out = []
        for pod in self.d.store.pods.values():
            if pod.initializing:
                continue
            if f is not None:
                if f.id and pod.id != f.id:
                    continue
                if not convert.labels_match(pod.labels, f.label_selector):
                    continue
            out.append(pod)
        return out

    async def container_stats(self, request: cri.ContainerStatsRequest) -> cri.ContainerStatsResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        return cri.ContainerStatsResponse(stats=await self._stats().container(ctr))

    async def list_container_stats(self, request: cri.ListContainerStatsRequest) -> cri.ListContainerStatsResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        return cri.ListContainerStatsResponse(stats=await self._stats().many_containers(self._stats_containers(f)))

    async def pod_sandbox_stats(self, request: cri.PodSandboxStatsRequest) -> cri.PodSandboxStatsResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.PodSandboxStatsResponse(stats=await self._stats().pod(pod))

    async def list_pod_sandbox_stats(self, request: cri.ListPodSandboxStatsRequest) -> cri.ListPodSandboxStatsResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        return cri.ListPodSandboxStatsResponse(stats=await self._stats().many_pods(self._stats_pods(f)))

    async def list_metric_descriptors(self, request: cri.ListMetricDescriptorsRequest
                                      ) -> cri.ListMetricDescriptorsResponse:
        return cri.ListMetricDescriptorsResponse(descriptors=cadvisor.descriptors())

    async def _pod_metrics(self) -> list[cri.PodSandboxMetrics]:
        collector = self._stats()
        out = []
        for st in await collector.many_pods(self._stats_pods(None)):
            pod = self.d.store.pods.get(st.attributes.id)
            if pod is None:
                continue
            now = time.time_ns()
            cms = []
            for cst in st.linux.containers:
                ctr = self.d.store.containers.get(cst.attributes.id)
                if ctr is None:
                    continue
                rel = container_cgroup(collector.driver, pod, ctr)
                snap = await collector.snapshot(f"m/{ctr.id}", rel)
                ident = cadvisor.Identity(container=ctr.name, cgroup="/" + rel.strip("/"), image=ctr.image_ref,
                                          name=ctr.id, namespace=pod.namespace, pod=pod.name)
                sample = snap.sample
                cms.append(cadvisor.container_metrics(ident, cst, ctr.started_at, now,
                                                      sample.pids if sample else None,
                                                      sample.oom_events if sample else None))
            pod_ident = cadvisor.Identity(container="POD", cgroup="/" + pod_cgroup(collector.driver, pod).strip("/"),
                                          image="", name=pod.id, namespace=pod.namespace, pod=pod.name)
            out.append(cri.PodSandboxMetrics(pod_sandbox_id=pod.id, metrics=cadvisor.pod_metrics(pod_ident, st),
                                             container_metrics=cms))
        return out

    async def list_pod_sandbox_metrics(self, request: cri.ListPodSandboxMetricsRequest
                                       ) -> cri.ListPodSandboxMetricsResponse:
        return cri.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def stream_pod_sandbox_metrics(self, request: cri.StreamPodSandboxMetricsRequest
                                         ) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
        for page in _pages(await self._pod_metrics()):
            yield cri.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)

    # --- paged Stream* variants of the List RPCs ----------------------------------------------
    async def stream_pod_sandboxes(self, request: cri.StreamPodSandboxesRequest
                                   ) -> AsyncIterator[cri.StreamPodSandboxesResponse]:
        items = (await self.list_pod_sandbox(cri.ListPodSandboxRequest(filter=request.filter))).items
        for page in _pages(items):
            yield cri.StreamPodSandboxesResponse(pod_sandboxes=page)

    async def stream_containers(self, request: cri.StreamContainersRequest
                                ) -> AsyncIterator[cri.StreamContainersResponse]:
        items = (await self.list_containers(cri.ListContainersRequest(filter=request.filter))).containers
        for page in _pages(items):
            yield cri.StreamContainersResponse(containers=page)

    async def stream_container_stats(self, request: cri.StreamContainerStatsRequest
                                     ) -> AsyncIterator[cri.StreamContainerStatsResponse]:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        ctrs = self._stats_containers(f)
        for i in range(0, len(ctrs), STREAM_PAGE):
            stats = await self._stats().many_containers(ctrs[i:i + STREAM_PAGE])
            yield cri.StreamContainerStatsResponse(container_stats=stats)

    async def stream_pod_sandbox_stats(self, request: cri.StreamPodSandboxStatsRequest
                                       ) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        pods = self._stats_pods(f)
        for i in range(0, len(pods), STREAM_PAGE):
            stats = await self._stats().many_pods(pods[i:i + STREAM_PAGE])
            yield cri.StreamPodSandboxStatsResponse(pod_sandbox_stats=stats)

    # --- lifecycle events (Evented PLEG) ------------------------------------------------------
    async def get_container_events(self, request: cri.GetEventsRequest) -> AsyncIterator[cri.ContainerEventResponse]:
        sub = self.d.events.subscribe(EVENT_BUFFER)
        try:
            while True:
                try:
                    ev = await sub.get(timeout=EVENT_IDLE)
                except TimeoutError:
                    continue  # idle; the wait is bounded so cancellation and shutdown are never stuck
                except SubscriberOverflow as e:
                    raise errors.ResourceExhausted(f"GetContainerEvents: {e}") from None
                await self._load_users(self.d.store.pod_containers(ev.pod_id))
                yield self._event_response(ev)
        finally:
            sub.close()

    def _remember_pod(self, ev: LifecycleEvent) -> None:
        """Runs at publish time, before a removal makes the pod's record disappear."""
        if ev.kind == events.DELETED:
            self._users.pop(ev.container_id, None)
        pod = self.d.store.pods.get(ev.pod_id) if self.d.store is not None else None
        if pod is None:
            return
        self._last_pod_status[pod.id] = convert.pod_status(pod)
        self._last_pod_status.move_to_end(pod.id)
        while len(self._last_pod_status) > POD_STATUS_MEMORY:
            self._last_pod_status.popitem(last=False)

    def _event_response(self, ev: LifecycleEvent) -> cri.ContainerEventResponse:
        pod = self.d.store.pods.get(ev.pod_id)
        if pod is not None:
            status = convert.pod_status(pod)
            ctrs = [self._container_status(c) for c in self.d.store.pod_containers(pod.id)]
        else:
            # A removed pod: the status last seen, marked not ready (kubelet needs its metadata).
            last = self._last_pod_status.get(ev.pod_id)
            status = cri.PodSandboxStatus(id=ev.pod_id) if last is None else cri.PodSandboxStatus().parse(bytes(last))
            status.state = cri.PodSandboxState.SANDBOX_NOTREADY
            ctrs = []
        return cri.ContainerEventResponse(container_id=ev.container_id, container_event_type=_EVENT_TYPES[ev.kind],
                                          created_at=ev.at_ns, pod_sandbox_status=status,
                                          containers_statuses=ctrs)

    # --- resources ------------------------------------------------------------------------------
    async def update_container_resources(self, request: cri.UpdateContainerResourcesRequest
                                         ) -> cri.UpdateContainerResourcesResponse:
        cid = validate.required_id(request.container_id, "container_id")
        if not betterproto.serialized_on_wire(request.linux):
            raise errors.InvalidArgument("linux must be set (only Linux resources are supported)")
        ocispec.validate_resources(request.linux, "linux")
        await self.d.containers.update_resources(cid, request.linux)
        return cri.UpdateContainerResourcesResponse()

    async def update_pod_sandbox_resources(self, request: cri.UpdatePodSandboxResourcesRequest
                                           ) -> cri.UpdatePodSandboxResourcesResponse:
        # kubelet owns pod-level cgroups and sizes them itself; the runtime only checks and acknowledges
        # (runtimes that run pods in VMs would resize the VM here).
        self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        for name in ("overhead", "resources"):
            res = getattr(request, name)
            if betterproto.serialized_on_wire(res):
                ocispec.validate_resources(res, name)
        return cri.UpdatePodSandboxResourcesResponse()

    @staticmethod
    def _require_running(ctr: ContainerRecord) -> None:
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running (state {ctr.state})")

    async def _load_users(self, ctrs: list[ContainerRecord]) -> None:
        missing = [c for c in ctrs if c.id not in self._users and c.bundle]
        if missing:
            for cid, user in zip([c.id for c in missing],
                                 await asyncio.to_thread(lambda: [_spec_user(c.bundle) for c in missing]),
                                 strict=True):
                if user is not None:
                    self._users[cid] = user

    def _container_status(self, ctr: ContainerRecord) -> cri.ContainerStatus:
        status = convert.container_status(ctr, self._image_ref(ctr.image_id))
        if (user := self._users.get(ctr.id)) is not None:
            status.user = user
        # The current resources (as created, then as updated): kubelet compares them for in-place resize.
        res = (ctr.config.get("linux") or {}).get("resources")
        if res:
            status.resources = cri.ContainerResources(linux=cri.LinuxContainerResources().from_dict(res))
        return status

    def _image_ref(self, image_id: str) -> str:
        image = self.d.images.get(image_id)
        if image is None:
            return image_id
        return image.repo_digests[0] if image.repo_digests else image.id

