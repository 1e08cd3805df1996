"""cAdvisor-named metrics for ListMetricDescriptors / ListPodSandboxMetrics.

Names follow cAdvisor's Prometheus metrics, which kubelet's /metrics/cadvisor serves when it takes
pod and container stats from the runtime. The CRI carries integers only, so time-based counters
are whole seconds. Every series carries cAdvisor's identifying labels first (container, id, image,
name, namespace, pod), since kubelet exports the values as they come and needs them to tell series apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import betterproto

from shimd.api.runtime import v1 as cri

BASE_LABELS = ("container", "id", "image", "name", "namespace", "pod")

COUNTER = cri.MetricType.COUNTER
GAUGE = cri.MetricType.GAUGE


@dataclass(frozen=True)
class Desc:
    name: str
    help: str
    kind: cri.MetricType
    labels: tuple[str, ...] = ()


CONTAINER = [
    Desc("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", COUNTER),
    Desc("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of "
         "when it was accessed.", GAUGE),
    Desc("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE),
    Desc("container_memory_rss", "Size of RSS in bytes.", GAUGE),
    Desc("container_memory_cache", "Number of bytes of page cache memory.", GAUGE),
    Desc("container_memory_swap", "Container swap usage in bytes.", GAUGE),
    Desc("container_memory_failures_total", "Cumulative count of memory allocation failures.", COUNTER,
         ("failure_type", "scope")),
    Desc("container_oom_events_total", "Count of out of memory events observed for the container.", COUNTER),
    Desc("container_spec_memory_limit_bytes", "Memory limit for the container.", GAUGE),
    Desc("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.",
         GAUGE, ("device",)),
    Desc("container_fs_inodes_total", "Number of inodes used by the container on this filesystem.", GAUGE,
         ("device",)),
    Desc("container_processes", "Number of processes running inside the container.", GAUGE),
    Desc("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", GAUGE),
    Desc("container_last_seen", "Last time a container was seen by the exporter.", GAUGE),
]

POD = [
    Desc("container_network_receive_bytes_total", "Cumulative count of bytes received.", COUNTER, ("interface",)),
    Desc("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.",
         COUNTER, ("interface",)),
    Desc("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", COUNTER,
         ("interface",)),
    Desc("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.",
         COUNTER, ("interface",)),
]

_BY_NAME = {d.name: d for d in CONTAINER + POD}


def descriptors() -> list[cri.MetricDescriptor]:
    return [cri.MetricDescriptor(name=d.name, help=d.help, label_keys=[*BASE_LABELS, *d.labels])
            for d in CONTAINER + POD]


@dataclass(frozen=True)
class Identity:
    """Values of BASE_LABELS for one container (or for the pod, with container "POD")."""

    container: str
    cgroup: str
    image: str
    name: str
    namespace: str
    pod: str

    def values(self) -> list[str]:
        return [self.container, self.cgroup, self.image, self.name, self.namespace, self.pod]


def metric(ident: Identity, name: str, ts: int, value: int | None, labels: tuple[str, ...] = ()) -> cri.Metric | None:
    if value is None:
        return None
    d = _BY_NAME[name]
    return cri.Metric(name=name, timestamp=ts, metric_type=d.kind, label_values=[*ident.values(), *labels],
                      value=cri.UInt64Value(value=max(0, int(value))))


def _has(m: Any) -> bool:
    """betterproto hands back default instances for unset message fields."""
    return m is not None and betterproto.serialized_on_wire(m)


def _v(u: cri.UInt64Value | None) -> int | None:
    return int(u.value) if _has(u) else None


def container_metrics(ident: Identity, st: cri.ContainerStats, started_at_ns: int, now_ns: int, pids: int | None,
                      oom_events: int | None) -> cri.ContainerMetrics:
    out: list[cri.Metric | None] = []
    m = partial(metric, ident)
    cpu, mem, fs = st.cpu, st.memory, st.writable_layer
    if _has(cpu) and _has(cpu.usage_core_nano_seconds):
        out.append(m("container_cpu_usage_seconds_total", cpu.timestamp,
                          cpu.usage_core_nano_seconds.value // 1_000_000_000))
    if _has(mem):
        ts = mem.timestamp
        out += [
            m("container_memory_usage_bytes", ts, _v(mem.usage_bytes)),
            m("container_memory_working_set_bytes", ts, _v(mem.working_set_bytes)),
            m("container_memory_rss", ts, _v(mem.rss_bytes)),
            m("container_memory_failures_total", ts, _v(mem.page_faults), ("pgfault", "container")),
            m("container_memory_failures_total", ts, _v(mem.major_page_faults), ("pgmajfault", "container")),
        ]
        if _has(mem.available_bytes) and _has(mem.working_set_bytes):
            out.append(m("container_spec_memory_limit_bytes", ts,
                              mem.available_bytes.value + mem.working_set_bytes.value))
    if _has(st.swap) and _has(st.swap.swap_usage_bytes):
        out.append(m("container_memory_swap", st.swap.timestamp, st.swap.swap_usage_bytes.value))
    if _has(fs):
        dev = fs.fs_id.mountpoint
        out.append(m("container_fs_usage_bytes", fs.timestamp, _v(fs.used_bytes), (dev,)))
        out.append(m("container_fs_inodes_total", fs.timestamp, _v(fs.inodes_used), (dev,)))
    out.append(m("container_processes", now_ns, pids))
    out.append(m("container_oom_events_total", now_ns, oom_events))
    if started_at_ns:
        out.append(m("container_start_time_seconds", now_ns, started_at_ns // 1_000_000_000))
    out.append(m("container_last_seen", now_ns, now_ns // 1_000_000_000))
    return cri.ContainerMetrics(container_id=st.attributes.id, metrics=[m for m in out if m is not None])


def pod_metrics(ident: Identity, st: cri.PodSandboxStats) -> list[cri.Metric]:
    out: list[cri.Metric | None] = []
    m = partial(metric, ident)
    net = st.linux.network
    if _has(net):
        for i in net.interfaces:
            out += [
                m("container_network_receive_bytes_total", net.timestamp, _v(i.rx_bytes), (i.name,)),
                m("container_network_receive_errors_total", net.timestamp, _v(i.rx_errors), (i.name,)),
                m("container_network_transmit_bytes_total", net.timestamp, _v(i.tx_bytes), (i.name,)),
                m("container_network_transmit_errors_total", net.timestamp, _v(i.tx_errors), (i.name,)),
            ]
    return [m for m in out if m is not None]
