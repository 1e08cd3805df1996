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
from shimd.stats.detail import Detail
from shimd.stats.netdev import Interface

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
    # cpu="total": kubelet has cAdvisor report no per-CPU series.
    Desc("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", COUNTER, ("cpu",)),
    Desc("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.", COUNTER),
    Desc("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.", COUNTER),
    Desc("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.", COUNTER),
    Desc("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.", COUNTER),
    Desc("container_cpu_cfs_throttled_seconds_total", "Total time duration the container has been throttled.",
         COUNTER),
    Desc("container_spec_cpu_period", "CPU period of the container.", GAUGE),
    Desc("container_spec_cpu_quota", "CPU quota of the container.", GAUGE),
    Desc("container_spec_cpu_shares", "CPU share of the container.", GAUGE),
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
    Desc("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.", GAUGE),
    Desc("container_spec_memory_reservation_limit_bytes", "Memory reservation limit for the container.", GAUGE),
    Desc("container_memory_failcnt", "Number of memory usage hits limits", COUNTER),
    Desc("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.", GAUGE),
    Desc("container_memory_mapped_file", "Size of memory mapped files in bytes.", GAUGE),
    Desc("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes", GAUGE),
    Desc("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.",
         GAUGE, ("device",)),
    Desc("container_fs_inodes_total", "Number of inodes used by the container on this filesystem.", GAUGE,
         ("device",)),
    Desc("container_fs_inodes_free", "Number of available Inodes", GAUGE, ("device",)),
    Desc("container_fs_limit_bytes", "Number of bytes that can be consumed by the container on this filesystem.",
         GAUGE, ("device",)),
    Desc("container_fs_reads_bytes_total", "Cumulative count of bytes read", COUNTER, ("device",)),
    Desc("container_fs_reads_total", "Cumulative count of reads completed", COUNTER, ("device",)),
    Desc("container_fs_writes_bytes_total", "Cumulative count of bytes written", COUNTER, ("device",)),
    Desc("container_fs_writes_total", "Cumulative count of writes completed", COUNTER, ("device",)),
    Desc("container_blkio_device_usage_total", "Blkio Device bytes usage", COUNTER,
         ("device", "major", "minor", "operation")),
    Desc("container_processes", "Number of processes running inside the container.", GAUGE),
    Desc("container_threads", "Number of threads running inside the container", GAUGE),
    Desc("container_threads_max", "Maximum number of threads allowed inside the container, infinity if value "
         "is zero", GAUGE),
    Desc("container_file_descriptors", "Number of open file descriptors for the container.", GAUGE),
    Desc("container_sockets", "Number of open sockets for the container.", GAUGE),
    Desc("container_ulimits_soft", "Soft ulimit values for the container root process. Unlimited if -1, except "
         "priority and nice", GAUGE, ("ulimit",)),
    Desc("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", GAUGE),
    Desc("container_last_seen", "Last time a container was seen by the exporter.", GAUGE),
]

POD = [
    Desc("container_network_receive_bytes_total", "Cumulative count of bytes received.", COUNTER, ("interface",)),
    Desc("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.",
         COUNTER, ("interface",)),
    Desc("container_network_receive_packets_total", "Cumulative count of packets received", COUNTER,
         ("interface",)),
    Desc("container_network_receive_packets_dropped_total", "Cumulative count of packets dropped while receiving",
         COUNTER, ("interface",)),
    Desc("container_network_transmit_packets_total", "Cumulative count of packets transmitted", COUNTER,
         ("interface",)),
    Desc("container_network_transmit_packets_dropped_total", "Cumulative count of packets dropped while "
         "transmitting", COUNTER, ("interface",)),
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
                      oom_events: int | None, detail: Detail | None = None,
                      writable_dir: str = "") -> cri.ContainerMetrics:
    out: list[cri.Metric | None] = []
    m = partial(metric, ident)
    cpu, mem, fs = st.cpu, st.memory, st.writable_layer
    if _has(cpu) and _has(cpu.usage_core_nano_seconds):
        out.append(m("container_cpu_usage_seconds_total", cpu.timestamp,
                          cpu.usage_core_nano_seconds.value // 1_000_000_000, ("total",)))
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
    if detail is not None:
        out += _detail_metrics(m, detail, now_ns, fs.fs_id.mountpoint if _has(fs) else writable_dir)
    else:
        out.append(m("container_processes", now_ns, pids))
    out.append(m("container_oom_events_total", now_ns, oom_events))
    if started_at_ns:
        out.append(m("container_start_time_seconds", now_ns, started_at_ns // 1_000_000_000))
    out.append(m("container_last_seen", now_ns, now_ns // 1_000_000_000))
    return cri.ContainerMetrics(container_id=st.attributes.id, metrics=[m for m in out if m is not None])


def _seconds(ns: int | None) -> int | None:
    return None if ns is None else ns // 1_000_000_000


def _detail_metrics(m: partial[cri.Metric | None], d: Detail, ts: int, fs_dev: str) -> list[cri.Metric | None]:
    out = [
        m("container_cpu_user_seconds_total", ts, _seconds(d.cpu_user_ns)),
        m("container_cpu_system_seconds_total", ts, _seconds(d.cpu_system_ns)),
        m("container_cpu_cfs_periods_total", ts, d.cfs_periods),
        m("container_cpu_cfs_throttled_periods_total", ts, d.cfs_throttled_periods),
        m("container_cpu_cfs_throttled_seconds_total", ts, _seconds(d.cfs_throttled_ns)),
        m("container_spec_cpu_period", ts, d.cpu_period),
        m("container_spec_cpu_quota", ts, d.cpu_quota),
        m("container_spec_cpu_shares", ts, d.cpu_shares),
        m("container_spec_memory_swap_limit_bytes", ts, d.memory_swap_limit),
        m("container_spec_memory_reservation_limit_bytes", ts, d.memory_reservation),
        m("container_memory_failcnt", ts, d.memory_failcnt),
        m("container_memory_kernel_usage", ts, d.memory_kernel),
        m("container_memory_mapped_file", ts, d.memory_mapped_file),
        m("container_memory_cache", ts, d.memory_cache),
        m("container_memory_max_usage_bytes", ts, d.memory_max_usage),
        m("container_processes", ts, d.processes),
        m("container_threads", ts, d.threads),
        m("container_threads_max", ts, d.threads_max),
        m("container_file_descriptors", ts, d.file_descriptors),
        m("container_sockets", ts, d.sockets),
        m("container_ulimits_soft", ts, d.nofile_soft, ("max_open_files",)),
    ]
    if fs_dev:
        out += [m("container_fs_inodes_free", ts, d.fs_inodes_free, (fs_dev,)),
                m("container_fs_limit_bytes", ts, d.fs_limit_bytes, (fs_dev,))]
    for io in d.io:
        dev = io.name
        out += [m("container_fs_reads_bytes_total", ts, io.bytes.get("Read"), (dev,)),
                m("container_fs_reads_total", ts, io.ios.get("Read"), (dev,)),
                m("container_fs_writes_bytes_total", ts, io.bytes.get("Write"), (dev,)),
                m("container_fs_writes_total", ts, io.ios.get("Write"), (dev,))]
        out += [m("container_blkio_device_usage_total", ts, value, (dev, str(io.major), str(io.minor), op))
                for op, value in sorted(io.bytes.items())]
    return out


def pod_metrics(ident: Identity, st: cri.PodSandboxStats,
                interfaces: list[Interface] | None = None) -> list[cri.Metric]:
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
        for c in interfaces or []:
            out += [
                m("container_network_receive_packets_total", net.timestamp, c.rx_packets, (c.name,)),
                m("container_network_receive_packets_dropped_total", net.timestamp, c.rx_dropped, (c.name,)),
                m("container_network_transmit_packets_total", net.timestamp, c.tx_packets, (c.name,)),
                m("container_network_transmit_packets_dropped_total", net.timestamp, c.tx_dropped, (c.name,)),
            ]
    return [m for m in out if m is not None]
