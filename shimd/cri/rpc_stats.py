"""Stats and metrics RPCs (cgroups and the pod netns, through the stats collector)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from shimd.api.runtime import v1 as cri
from shimd.cri import convert, validate, wire
from shimd.cri.rpc_base import STREAM_PAGE, RpcBase, pages
from shimd.stats import cadvisor, detail
from shimd.stats.collector import StatsCollector, container_cgroup, pod_cgroup
from shimd.store.records import ContainerRecord, PodRecord


class StatsRpcs(RpcBase):
    # --- stats and metrics (issue 7) ---------------------------------------------------------
    def _stats(self) -> StatsCollector:
        return self.d.stats

    def _stats_containers(self, f: cri.ContainerStatsFilter | None) -> list[ContainerRecord]:
        want = convert.read_filter(f) if f is not None else None
        return [c for c in self.d.store.containers.values()
                if want is None or want.admits(c.id, c.labels, c.pod_id, prefix=False)]

    def _stats_pods(self, f: cri.PodSandboxStatsFilter | None) -> list[PodRecord]:
        want = convert.read_filter(f) if f is not None else None
        return [p for p in self.d.store.pods.values()
                if not p.initializing and (want is None or want.admits(p.id, p.labels, prefix=False))]

    async def container_stats(self, request: cri.ContainerStatsRequest) -> cri.ContainerStatsResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        return cri.ContainerStatsResponse(stats=await self._stats().container(ctr))

    async def list_container_stats(self, request: cri.ListContainerStatsRequest) -> cri.ListContainerStatsResponse:
        f = wire.submessage(request, "filter")
        return cri.ListContainerStatsResponse(stats=await self._stats().many_containers(self._stats_containers(f)))

    async def pod_sandbox_stats(self, request: cri.PodSandboxStatsRequest) -> cri.PodSandboxStatsResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.PodSandboxStatsResponse(stats=await self._stats().pod(pod))

    async def list_pod_sandbox_stats(self, request: cri.ListPodSandboxStatsRequest) -> cri.ListPodSandboxStatsResponse:
        f = wire.submessage(request, "filter")
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
                upper = f"{ctr.fs_dir}/upper" if ctr.fs_dir else ""
                extra = await asyncio.to_thread(detail.read, collector.layout, rel, upper)
                cms.append(cadvisor.container_metrics(ident, cst, ctr.started_at, now,
                                                      sample.pids if sample else None,
                                                      sample.oom_events if sample else None, extra, upper))
            pod_ident = cadvisor.Identity(container="POD", cgroup="/" + pod_cgroup(collector.driver, pod).strip("/"),
                                          image="", name=pod.id, namespace=pod.namespace, pod=pod.name)
            pod_ms = cadvisor.pod_metrics(pod_ident, st, collector.interfaces.get(pod.id))
            out.append(cri.PodSandboxMetrics(pod_sandbox_id=pod.id, metrics=pod_ms, container_metrics=cms))
        return out

    async def list_pod_sandbox_metrics(self, request: cri.ListPodSandboxMetricsRequest
                                       ) -> cri.ListPodSandboxMetricsResponse:
        return cri.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def stream_pod_sandbox_metrics(self, request: cri.StreamPodSandboxMetricsRequest
                                         ) -> AsyncIterator[cri.StreamPodSandboxMetricsResponse]:
        for page in pages(await self._pod_metrics()):
            yield cri.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=page)

    async def stream_container_stats(self, request: cri.StreamContainerStatsRequest
                                     ) -> AsyncIterator[cri.StreamContainerStatsResponse]:
        f = wire.submessage(request, "filter")
        ctrs = self._stats_containers(f)
        for i in range(0, len(ctrs), STREAM_PAGE):
            stats = await self._stats().many_containers(ctrs[i:i + STREAM_PAGE])
            yield cri.StreamContainerStatsResponse(container_stats=stats)

    async def stream_pod_sandbox_stats(self, request: cri.StreamPodSandboxStatsRequest
                                       ) -> AsyncIterator[cri.StreamPodSandboxStatsResponse]:
        f = wire.submessage(request, "filter")
        pods = self._stats_pods(f)
        for i in range(0, len(pods), STREAM_PAGE):
            stats = await self._stats().many_pods(pods[i:i + STREAM_PAGE])
            yield cri.StreamPodSandboxStatsResponse(pod_sandbox_stats=stats)
