"""Container and pod sandbox stats as CRI messages, from cgroups, writable layers and pod netns.

CPU nano-cores need two samples: as containerd does, the collector remembers the previous cumulative
usage of each container and pod and reports the rate over the interval since; the first sample
reports none (kubelet then computes the rate itself, as the CRI allows). kubelet's callers (summary
API, eviction manager, resource metrics) ask at nearly the same moment: a sample too close to the
remembered one reports the rate last computed and keeps the remembered sample, so no caller gets a
missing or zero rate because another one just asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shimd import cgroups, log
from shimd.api.runtime import v1 as cri
from shimd.stats import cgroupfs, diskusage, netdev
from shimd.store.records import CONTAINER_RUNNING, POD_READY, ContainerRecord, PodRecord

if TYPE_CHECKING:
    from shimd.store.store import Store

# A rate over less than this is noise (two calls within the same scrape): the last rate is reported instead.
MIN_INTERVAL_NS = 100_000_000
# Walking a writable layer costs a stat per file; kubelet asks several times per housekeeping round.
DISK_USAGE_TTL_NS = 5_000_000_000


def _u64(v: int | None) -> cri.UInt64Value | None:
    return None if v is None else cri.UInt64Value(value=max(0, int(v)))


@dataclass
class _Prev:
    ts: int
    usage: int
    rate: int | None = None  # the rate computed when this sample was taken


@dataclass
class Snapshot:
    """Plain numbers of one cgroup at one time (also used by the metrics endpoint)."""

    sample: cgroupfs.Sample | None
    nano_cores: int | None


def container_cgroup(driver: str, pod: PodRecord | None, ctr: ContainerRecord) -> str:
    parent = pod.cgroup_parent if pod else ""
    return cgroups.relative_path(driver, cgroups.container_path(driver, parent, ctr.id))


def pod_cgroup(driver: str, pod: PodRecord) -> str:
    if driver == "systemd":
        return cgroups.systemd_slice_to_path(pod.cgroup_parent or "system.slice")
    return pod.cgroup_parent


# For handlers whose containers' cgroups stay empty (gVisor accounts everything to its sandbox): the
# handler's runtime samples a container itself. Maps a handler name to its sampler, or None for cgroups.
Sampler = Callable[[str], Awaitable[cgroupfs.Sample | None]]
SamplerFor = Callable[[str], Sampler | None]


class StatsCollector:
    def __init__(self, store: Store, cgroup_driver: str, layout: cgroupfs.Layout | None = None,
                 sampler_for: SamplerFor | None = None) -> None:
        self.store = store
        self.sampler_for = sampler_for
        self.driver = cgroup_driver
        self.layout = layout or cgroupfs.Layout.detect()
        self._prev: dict[str, _Prev] = {}
        self._du: dict[str, tuple[int, diskusage.Usage]] = {}
        # The last counters read from each pod's netns: packet counts have no field in the CRI
        # messages, the cAdvisor metrics take them from here.
        self.interfaces: dict[str, list[netdev.Interface]] = {}
        self.log = log.get("stats")

    # --- raw samples -----------------------------------------------------------------------
    def _rate(self, key: str, s: cgroupfs.Sample | None) -> int | None:
        if s is None or s.cpu_usage_ns is None:
            return None
        prev = self._prev.get(key)
        if prev is not None and s.timestamp_ns - prev.ts < MIN_INTERVAL_NS:
            # Also a sample older than the remembered one: concurrent calls finish their reads in any order.
            return prev.rate
        rate = None
        if prev is not None and s.cpu_usage_ns >= prev.usage:  # lower: a restarted counter, start over
            rate = (s.cpu_usage_ns - prev.usage) * 1_000_000_000 // (s.timestamp_ns - prev.ts)
        self._prev[key] = _Prev(s.timestamp_ns, s.cpu_usage_ns, rate)
        return rate

    async def snapshot(self, key: str, rel: str) -> Snapshot:
        s = await asyncio.to_thread(cgroupfs.read, self.layout, rel)
        return Snapshot(s, self._rate(key, s))

    def forget_missing(self) -> None:
        """Drop rate state of objects that no longer exist (called on each list)."""
        live = set(self.store.containers) | set(self.store.pods)
        for k in [k for k in self._prev if k.split("/", 1)[-1] not in live]:
            del self._prev[k]
        for k in [k for k in self._du if k not in live]:
            del self._du[k]
        for k in [k for k in self.interfaces if k not in live]:
            del self.interfaces[k]

    # --- CRI messages ----------------------------------------------------------------------
    @staticmethod
    def _cpu(snap: Snapshot) -> cri.CpuUsage | None:
        s = snap.sample
        if s is None or s.cpu_usage_ns is None:
            return None
        return cri.CpuUsage(timestamp=s.timestamp_ns, usage_core_nano_seconds=_u64(s.cpu_usage_ns),
                            usage_nano_cores=_u64(snap.nano_cores))

    @staticmethod
    def _memory(snap: Snapshot) -> cri.MemoryUsage | None:
        s = snap.sample
        if s is None or s.memory_usage is None:
            return None
        available = None
        if s.memory_limit is not None and s.working_set is not None:
            available = max(0, s.memory_limit - s.working_set)
        return cri.MemoryUsage(timestamp=s.timestamp_ns, working_set_bytes=_u64(s.working_set),
                               available_bytes=_u64(available), usage_bytes=_u64(s.memory_usage),
                               rss_bytes=_u64(s.rss), page_faults=_u64(s.page_faults),
                               major_page_faults=_u64(s.major_page_faults))

    @staticmethod
    def _swap(snap: Snapshot) -> cri.SwapUsage | None:
        s = snap.sample
        if s is None or s.swap_usage is None:
            return None
        return cri.SwapUsage(timestamp=s.timestamp_ns, swap_usage_bytes=_u64(s.swap_usage))

    async def writable_layer(self, ctr: ContainerRecord) -> cri.FilesystemUsage | None:
        if not ctr.fs_dir:
            return None
        upper = f"{ctr.fs_dir}/upper"
        now = time.time_ns()
        cached = self._du.get(ctr.id)
        if cached is not None and now - cached[0] < DISK_USAGE_TTL_NS:
            at, u = cached
        else:
            fresh = await asyncio.to_thread(diskusage.usage, upper)
            if fresh is None:
                return None
            at, u = now, fresh
            self._du[ctr.id] = (at, u)
        return cri.FilesystemUsage(timestamp=at, fs_id=cri.FilesystemIdentifier(mountpoint=upper),
                                   used_bytes=_u64(u.bytes), inodes_used=_u64(u.inodes))

    async def container(self, ctr: ContainerRecord) -> cri.ContainerStats:
        pod = self.store.pods.get(ctr.pod_id)
        attrs = cri.ContainerAttributes(id=ctr.id, metadata=cri.ContainerMetadata(name=ctr.name, attempt=ctr.attempt),
                                        labels=dict(ctr.labels), annotations=dict(ctr.annotations))
        out = cri.ContainerStats(attributes=attrs)
        if ctr.state == CONTAINER_RUNNING:
            sampler = self.sampler_for(pod.handler) if (pod is not None and self.sampler_for) else None
            if sampler is not None:
                s = await sampler(ctr.id)
                snap = Snapshot(s, self._rate(f"c/{ctr.id}", s))
            else:
                snap = await self.snapshot(f"c/{ctr.id}", container_cgroup(self.driver, pod, ctr))
            if (cpu := self._cpu(snap)) is not None:
                out.cpu = cpu
            if (mem := self._memory(snap)) is not None:
                out.memory = mem
            if (swap := self._swap(snap)) is not None:
                out.swap = swap
        if (fs := await self.writable_layer(ctr)) is not None:
            out.writable_layer = fs
        return out

    async def network(self, pod: PodRecord) -> cri.NetworkUsage | None:
        path = pod.namespaces.get("network")
        if pod.host_network or not path or pod.state != POD_READY:
            return None
        try:
            ifaces = await netdev.read_netns(path)
        except (OSError, TimeoutError) as e:
            self.log.debug("pod network counters unavailable", pod_id=pod.id, error=str(e))
            return None
        self.interfaces[pod.id] = ifaces
        usages = [cri.NetworkInterfaceUsage(name=i.name, rx_bytes=_u64(i.rx_bytes), rx_errors=_u64(i.rx_errors),
                                            tx_bytes=_u64(i.tx_bytes), tx_errors=_u64(i.tx_errors))
                  for i in ifaces]
        default = next((u for u in usages if u.name == "eth0"), usages[0] if usages else None)
        net = cri.NetworkUsage(timestamp=time.time_ns(), interfaces=usages)
        if default is not None:
            net.default_interface = default
        return net

    async def pod(self, pod: PodRecord) -> cri.PodSandboxStats:
        md = cri.PodSandboxMetadata(name=pod.name, uid=pod.uid, namespace=pod.namespace, attempt=pod.attempt)
        attrs = cri.PodSandboxAttributes(id=pod.id, metadata=md, labels=dict(pod.labels),
                                         annotations=dict(pod.annotations))
        ctrs = [c for c in self.store.pod_containers(pod.id) if c.state == CONTAINER_RUNNING]
        snap, net, cstats = await asyncio.gather(
            self.snapshot(f"p/{pod.id}", pod_cgroup(self.driver, pod)),
            self.network(pod),
            asyncio.gather(*(self.container(c) for c in ctrs)),
        )
        linux = cri.LinuxPodSandboxStats(containers=list(cstats))
        if (cpu := self._cpu(snap)) is not None:
            linux.cpu = cpu
        if (mem := self._memory(snap)) is not None:
            linux.memory = mem
        if net is not None:
            linux.network = net
        if snap.sample is not None and snap.sample.pids is not None:
            linux.process = cri.ProcessUsage(timestamp=snap.sample.timestamp_ns,
                                             process_count=_u64(snap.sample.pids))
        return cri.PodSandboxStats(attributes=attrs, linux=linux)

    async def many_containers(self, ctrs: list[ContainerRecord]) -> list[cri.ContainerStats]:
        self.forget_missing()
        results = await asyncio.gather(*(self.container(c) for c in ctrs), return_exceptions=True)
        out = []
        for c, r in zip(ctrs, results, strict=True):
            if isinstance(r, BaseException):
                self.log.warning("container stats failed", container_id=c.id, error=repr(r))
                continue
            out.append(r)
        return out

    async def many_pods(self, pods: list[PodRecord]) -> list[cri.PodSandboxStats]:
        self.forget_missing()
        results = await asyncio.gather(*(self.pod(p) for p in pods), return_exceptions=True)
        out = []
        for p, r in zip(pods, results, strict=True):
            if isinstance(r, BaseException):
                self.log.warning("pod stats failed", pod_id=p.id, error=repr(r))
                continue
            out.append(r)
        return out

