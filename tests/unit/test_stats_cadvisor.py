"""cAdvisor-style CRI metrics: every series has exactly the labels its descriptor declares."""

from __future__ import annotations

from shimd.api.runtime import v1 as cri
from shimd.stats import cadvisor


def _u(v: int) -> cri.UInt64Value:
    return cri.UInt64Value(value=v)


def test_metrics_match_descriptors() -> None:
    keys = {d.name: list(d.label_keys) for d in cadvisor.descriptors()}
    assert all(k[:6] == list(cadvisor.BASE_LABELS) for k in keys.values())
    st = cri.ContainerStats(
        attributes=cri.ContainerAttributes(id="c1"),
        cpu=cri.CpuUsage(timestamp=5, usage_core_nano_seconds=_u(3_500_000_000)),
        memory=cri.MemoryUsage(timestamp=5, working_set_bytes=_u(100), usage_bytes=_u(150), rss_bytes=_u(80),
                               available_bytes=_u(900), page_faults=_u(7), major_page_faults=_u(1)),
        writable_layer=cri.FilesystemUsage(timestamp=5, fs_id=cri.FilesystemIdentifier(mountpoint="/u"),
                                           used_bytes=_u(4096), inodes_used=_u(3)))
    ident = cadvisor.Identity("app", "/shimd/pod1/c1", "busybox", "c1", "default", "web")
    cm = cadvisor.container_metrics(ident, st, started_at_ns=2_000_000_000, now_ns=9_000_000_000, pids=4,
                                    oom_events=0)
    by_name = {m.name: m for m in cm.metrics}
    for m in cm.metrics:
        assert len(m.label_values) == len(keys[m.name]), m.name
        assert m.label_values[:6] == ["app", "/shimd/pod1/c1", "busybox", "c1", "default", "web"]
    assert by_name["container_cpu_usage_seconds_total"].value.value == 3
    assert by_name["container_spec_memory_limit_bytes"].value.value == 1000
    assert by_name["container_processes"].value.value == 4
    assert by_name["container_start_time_seconds"].value.value == 2
    assert by_name["container_cpu_usage_seconds_total"].metric_type == cri.MetricType.COUNTER

    pst = cri.PodSandboxStats(linux=cri.LinuxPodSandboxStats(network=cri.NetworkUsage(timestamp=5, interfaces=[
        cri.NetworkInterfaceUsage(name="eth0", rx_bytes=_u(10), rx_errors=_u(0), tx_bytes=_u(20), tx_errors=_u(0))])))
    pm = cadvisor.pod_metrics(cadvisor.Identity("POD", "/shimd/pod1", "", "p1", "default", "web"), pst)
    assert {m.name for m in pm} == {"container_network_receive_bytes_total", "container_network_receive_errors_total",
                                    "container_network_transmit_bytes_total",
                                    "container_network_transmit_errors_total"}
    for m in pm:
        assert len(m.label_values) == len(keys[m.name]) and m.label_values[-1] == "eth0"
