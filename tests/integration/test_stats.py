"""Stats, live resource updates and memory limits on real runc containers."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.runtime import Runtime

V1 = Path("/sys/fs/cgroup")


def _cgroup_file(controller: str, pod_id: str, cid: str, name: str) -> str:
    # Pods without a kubelet cgroup parent live under /shimd/pod<id16> (cgroupfs driver).
    return (V1 / controller / "shimd" / f"pod{pod_id[:16]}" / cid / name).read_text().strip()


def _runc_stats(rt: Runtime, cid: str) -> dict:
    out = subprocess.run(["runc", "--root", str(rt.proc.state / "runc"), "events", "--stats", cid],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return json.loads(out)["data"]


def _burner(rt: Runtime, pod_id: str, pod_cfg, **kw) -> str:
    # Burns CPU and holds ~32 MiB of anonymous memory (a shell variable grown by doubling).
    script = ("x=0123456789abcdef; i=0; while [ $i -lt 21 ]; do x=$x$x; i=$((i+1)); done; "
              "while :; do :; done")
    cid = rt.create(pod_id, pod_cfg, "burn", ["sh", "-c", script], **kw)
    rt.start(cid)
    return cid


def test_stats_move_and_match_runc(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("stats", labels={"app": "stats"})
    cid = _burner(rt, pod_id, pod_cfg, labels={"role": "burner"})
    idle = rt.create(pod_id, pod_cfg, "idle", ["sleep", "60"], labels={"role": "idle"})
    rt.start(idle)

    first = rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    time.sleep(1.0)
    second = rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    assert second.attributes.id == cid and second.attributes.metadata.name == "burn"
    assert second.cpu.usage_core_nano_seconds.value > first.cpu.usage_core_nano_seconds.value
    # A busy loop on a 2-core host: between a tenth of a core and two cores.
    assert 100_000_000 < second.cpu.usage_nano_cores.value <= 2_100_000_000
    assert second.memory.working_set_bytes.value > 20 * 2**20
    assert second.memory.usage_bytes.value >= second.memory.working_set_bytes.value
    assert second.memory.rss_bytes.value > 20 * 2**20
    assert second.memory.page_faults.value > 0
    assert second.writable_layer.fs_id.mountpoint.endswith("/upper")
    assert second.writable_layer.inodes_used.value >= 1

    # Same numbers as runc's own view, within the time between the two reads.
    ours = rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    theirs = _runc_stats(rt, cid)
    assert abs(theirs["cpu"]["usage"]["total"] - ours.cpu.usage_core_nano_seconds.value) < 400_000_000
    assert abs(theirs["memory"]["usage"]["usage"] - ours.memory.usage_bytes.value) < 4 * 2**20

    # Writable layer grows when the container writes.
    rt.client.runtime.ExecSync(pb.ExecSyncRequest(container_id=idle, cmd=["sh", "-c", "head -c 3000000 "
                                                  "/dev/zero > /blob"], timeout=10))
    st = rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=idle)).stats
    assert st.writable_layer.used_bytes.value >= 3_000_000

    # Filters: by id, pod and labels.
    all_stats = rt.client.runtime.ListContainerStats(pb.ListContainerStatsRequest()).stats
    assert {s.attributes.id for s in all_stats} == {cid, idle}
    by_label = rt.client.runtime.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(label_selector={"role": "idle"}))).stats
    assert [s.attributes.id for s in by_label] == [idle]
    by_pod = rt.client.runtime.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id="nope"))).stats
    assert by_pod == []

    pst = rt.client.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats
    assert pst.attributes.id == pod_id and pst.attributes.labels["app"] == "stats"
    assert pst.linux.cpu.usage_core_nano_seconds.value >= ours.cpu.usage_core_nano_seconds.value
    assert pst.linux.memory.working_set_bytes.value > 20 * 2**20
    assert pst.linux.process.process_count.value >= 2
    assert {c.attributes.id for c in pst.linux.containers} == {cid, idle}
    # Loopback-only CNI: the pod netns has no interface but lo, so the network block may be empty.
    listed = rt.client.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
        filter=pb.PodSandboxStatsFilter(label_selector={"app": "other"}))).stats
    assert listed == []

    streamed = [s.attributes.id for resp in rt.client.runtime.StreamContainerStats(
        pb.StreamContainerStatsRequest()) for s in resp.container_stats]
    assert sorted(streamed) == sorted([cid, idle])
    pods = [p.id for resp in rt.client.runtime.StreamPodSandboxes(pb.StreamPodSandboxesRequest())
            for p in resp.pod_sandboxes]
    assert pods == [pod_id]

    descs = rt.client.runtime.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors
    assert "container_memory_working_set_bytes" in {d.name for d in descs}
    metrics = rt.client.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    assert [m.pod_sandbox_id for m in metrics] == [pod_id]
    names = {m.name for cm in metrics[0].container_metrics for m in cm.metrics}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes"} <= names
    keys = {d.name: len(d.label_keys) for d in descs}
    for cm in metrics[0].container_metrics:
        for m in cm.metrics:
            assert len(m.label_values) == keys[m.name], m.name

    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id="missing"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_resources_live_and_persisted(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("upd")
    res = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=50000, cpu_shares=512,
                                     memory_limit_in_bytes=64 * 2**20)
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "60"], linux=pb.LinuxContainerConfig(resources=res))
    rt.start(cid)
    assert _cgroup_file("cpu", pod_id, cid, "cpu.cfs_quota_us") == "50000"
    assert _cgroup_file("cpu", pod_id, cid, "cpu.shares") == "512"
    assert _cgroup_file("memory", pod_id, cid, "memory.limit_in_bytes") == str(64 * 2**20)

    rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(cpu_quota=150000, memory_limit_in_bytes=96 * 2**20)))
    assert _cgroup_file("cpu", pod_id, cid, "cpu.cfs_quota_us") == "150000"
    assert _cgroup_file("cpu", pod_id, cid, "cpu.shares") == "512"  # unset fields keep their values
    assert _cgroup_file("memory", pod_id, cid, "memory.limit_in_bytes") == str(96 * 2**20)
    st = rt.status(cid)
    assert st.resources.linux.cpu_quota == 150000
    assert st.resources.linux.memory_limit_in_bytes == 96 * 2**20
    assert st.resources.linux.cpu_shares == 512

    # A created (not yet started) container starts with the updated values.
    later = rt.create(pod_id, pod_cfg, "later", ["sleep", "60"])
    rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=later, linux=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=30000)))
    rt.start(later)
    assert _cgroup_file("cpu", pod_id, later, "cpu.cfs_quota_us") == "30000"

    # Survives a daemon restart.
    rt.proc.stop()
    rt.proc.start()
    st = rt.status(cid)
    assert st.resources.linux.cpu_quota == 150000

    for bad, field in ((pb.LinuxContainerResources(cpu_shares=1), "cpu_shares"),
                       (pb.LinuxContainerResources(memory_limit_in_bytes=-5), "memory_limit_in_bytes"),
                       (pb.LinuxContainerResources(cpu_period=10), "cpu_period"),
                       (pb.LinuxContainerResources(memory_limit_in_bytes=2**62), "memory_limit_in_bytes")):
        with pytest.raises(grpc.RpcError) as e:
            rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(container_id=cid,
                                                                                          linux=bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()
    assert _cgroup_file("cpu", pod_id, cid, "cpu.cfs_quota_us") == "150000"

    # Bad resources at create: refused, nothing created.
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "bad", ["true"], linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(cpu_quota=-7)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cpu_quota" in e.value.details()
    names = [c.metadata.name for c in rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers]
    assert sorted(names) == ["c", "later"]


def test_memory_limit_oom_killed(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("oom")
    limit = 16 * 2**20
    res = pb.LinuxContainerResources(memory_limit_in_bytes=limit, memory_swap_limit_in_bytes=limit)
    # Doubling a shell variable past the limit (64 MiB of string).
    script = "x=0123456789abcdef; while :; do x=$x$x; done"
    cid = rt.create(pod_id, pod_cfg, "hog", ["sh", "-c", script], linux=pb.LinuxContainerConfig(resources=res))
    rt.start(cid)
    st = rt.wait_state(cid, pb.CONTAINER_EXITED, timeout=30)
    assert st.reason == "OOMKilled"
    assert st.exit_code == 137


def test_pod_network_stats(net_rt: Any) -> None:
    rt = net_rt.rt
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("netstats")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "60"])
    rt.start(cid)
    before = rt.client.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats.linux.network
    assert before.default_interface.name == "eth0"
    # Traffic out of the pod: ping the bridge (the gateway, .1) with 20 KB.
    r = rt.client.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=[
        "ping", "-c", "2", "-s", "10000", "-W", "2", net_rt.net.ip(1)], timeout=15))
    assert r.exit_code == 0, r.stderr
    after = rt.client.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats.linux.network
    assert after.default_interface.tx_bytes.value >= before.default_interface.tx_bytes.value + 20000
    assert after.default_interface.rx_bytes.value >= before.default_interface.rx_bytes.value + 20000
    assert after.default_interface.rx_errors.value == 0
    # Same counters as the kernel's view from inside the pod.
    dev = rt.client.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/proc/net/dev"],
                                                        timeout=5)).stdout.decode()
    eth0 = next(line for line in dev.splitlines() if line.strip().startswith("eth0:")).split(":")[1].split()
    assert abs(int(eth0[0]) - after.default_interface.rx_bytes.value) < 2000


def _pod_cgroup_file(controller: str, pod_id: str, name: str) -> str:
    return (V1 / controller / "shimd" / f"pod{pod_id[:16]}" / name).read_text().strip()


def test_update_pod_sandbox_resources(rt: Runtime) -> None:
    pb = rt.pb
    # No cgroup_parent from a kubelet: shimd owns the pod cgroup, so pod-level limits land there.
    pod_id, pod_cfg = rt.run_pod("podres")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "60"], linux=pb.LinuxContainerConfig(
        resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=50000, memory_limit_in_bytes=64 * 2**20)))
    rt.start(cid)
    rt.client.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id,
        resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=80000, cpu_shares=1024,
                                             memory_limit_in_bytes=96 * 2**20),
        overhead=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=10000, memory_limit_in_bytes=16 * 2**20)))
    assert _pod_cgroup_file("cpu", pod_id, "cpu.cfs_quota_us") == "90000"
    assert _pod_cgroup_file("cpu", pod_id, "cpu.shares") == "1024"
    assert _pod_cgroup_file("memory", pod_id, "memory.limit_in_bytes") == str(112 * 2**20)
    # The container keeps its own, tighter limits underneath.
    assert _cgroup_file("cpu", pod_id, cid, "cpu.cfs_quota_us") == "50000"

    def recorded() -> dict:
        st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
        return json.loads(st.info["info"])["resources"]

    assert recorded()["resources"]["memoryLimitInBytes"] == str(96 * 2**20)
    rt.proc.stop()
    rt.proc.start()
    assert recorded()["overhead"]["cpuQuota"] == "10000"  # persisted across a restart

    # A pod quota below the container's own: the kernel refuses it; the error names the field.
    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=20000)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cpu_quota" in e.value.details()
    assert _pod_cgroup_file("cpu", pod_id, "cpu.cfs_quota_us") == "90000"
    for bad, code in ((pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="nope"), grpc.StatusCode.NOT_FOUND),
                      (pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(
                          memory_limit_in_bytes=-1)), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as e:
            rt.client.runtime.UpdatePodSandboxResources(bad)
        assert e.value.code() == code
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.UpdatePodSandboxResources(pb.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(memory_limit_in_bytes=2**30)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
