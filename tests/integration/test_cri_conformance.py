"""What critest and kubelet found missing (issue 15), each through the grpcio client against real runc."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import grpc
import pytest

from tests.support.runtime import Runtime, exec_sync, wait_log
from tests.support.spdy_client import run_remotecommand


def _code(fn: object, request: object) -> grpc.StatusCode | None:
    try:
        fn(request)  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return None


def _error(fn: object, request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(request)  # type: ignore[operator]
    return e.value


def _running(rt: Runtime, pod_id: str, pod_cfg: object, name: str, command: list[str], **kw: object) -> str:
    cid = rt.create(pod_id, pod_cfg, name, command, **kw)
    rt.start(cid)
    rt.wait_state(cid, rt.pb.CONTAINER_RUNNING)
    return cid


def test_pod_hostname_is_derived_when_none_is_sent(rt: Runtime) -> None:
    pb = rt.pb
    # critest's pod names: longer than a hostname label may be, with capitals.
    long_name = "PodSandbox-For-Hostname-Test-" + "x" * 40
    pod_id, pod_cfg = rt.run_pod(long_name)
    cid = _running(rt, pod_id, pod_cfg, "c", ["sleep", "1000"])
    hostname = exec_sync(rt, cid, ["hostname"])[1].strip()
    assert hostname == pod_id[:12], hostname
    assert exec_sync(rt, cid, ["cat", "/etc/hostname"])[1].strip() == hostname
    assert f"HOSTNAME={hostname}" in exec_sync(rt, cid, ["env"])[1]

    # A pod on the host's network keeps the node's hostname, whatever its name.
    sc = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(network=pb.NODE))
    host_pod, host_cfg = rt.run_pod("HostNet-" + "y" * 70, linux=pb.LinuxPodSandboxConfig(security_context=sc))
    host_cid = _running(rt, host_pod, host_cfg, "c", ["sleep", "1000"])
    assert exec_sync(rt, host_cid, ["hostname"])[1].strip() == os.uname().nodename

    # Only a hostname the client sent is refused.
    err = _error(rt.client.runtime.RunPodSandbox, pb.RunPodSandboxRequest(
        config=rt.pod_config("bad-hostname", hostname="Not_A_Hostname")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.hostname" in err.details()


def test_log_file_exists_when_start_returns(rt: Runtime) -> None:
    pod_id, pod_cfg = rt.run_pod("logfile")
    cid = rt.create(pod_id, pod_cfg, "quiet", ["sleep", "1000"])
    log = rt.log_dir / "logfile" / "quiet" / "0.log"
    rt.start(cid)
    # Right after StartContainer, with nothing written yet: kubelet and critest open it at once.
    assert log.exists() and log.read_bytes() == b""
    assert rt.status(cid).log_path == str(log)


def test_attach_without_a_log_file(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    pod_id, pod_cfg = rt.run_pod("attach-nolog")
    # critest's attach container: a shell reading stdin, no log path, no TTY.
    cfg = rt.container_config("shell", ["sh"], stdin=True, stdin_once=True)
    cfg.log_path = ""
    cid = r.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg,
                                                      sandbox_config=pod_cfg)).container_id
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    assert rt.status(cid).log_path == ""
    url = r.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)).url
    # No trailing newline on the first line: attach relays output as it comes, not line by line.
    script = b"printf partial-; echo hello; echo to-err >&2; exit 4\n"
    res = asyncio.run(run_remotecommand(url, stdin_data=script, timeout=30))
    assert res.stdout == b"partial-hello\n"
    assert res.stderr == b"to-err\n"
    assert rt.wait_state(cid, pb.CONTAINER_EXITED).exit_code == 4


def test_reopen_container_log_after_rename_loses_no_line(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("rotate")
    # A numbered line every 20 ms, so lines are being written while the log is rotated.
    cid = _running(rt, pod_id, pod_cfg, "counter",
                   ["sh", "-c", "i=0; while [ $i -lt 100000 ]; do echo n$i; i=$((i+1)); sleep 0.02; done"])
    log = Path(rt.status(cid).log_path)
    assert "n5\n" in wait_log(log, "n5\n")
    rotated = log.with_name("0.log.20260101-000000")
    # kubelet's rotation: rename, then ReopenContainerLog; the new file exists when the call returns.
    os.rename(log, rotated)
    rt.client.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert log.exists(), "ReopenContainerLog must create the file at the configured path before it returns"
    content = wait_log(log, "n")
    first_new = int(re.search(r" stdout F n(\d+)$", content, re.M).group(1))  # type: ignore[union-attr]
    assert f"n{first_new + 5}\n" in wait_log(log, f"n{first_new + 5}\n")
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10))

    def numbers(path: Path) -> list[int]:
        return [int(m) for m in re.findall(r"^\S+ stdout F n(\d+)$", path.read_text(), re.M)]

    old, new = numbers(rotated), numbers(log)
    assert old and new and old[-1] < new[0]
    assert old + new == list(range(len(old) + len(new))), "a line was lost or repeated in rotation"


def test_run_as_group_without_a_user_is_invalid(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    pod_id, pod_cfg = rt.run_pod("group-only")
    cfg = rt.container_config("c", ["true"], linux=pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(run_as_group=pb.Int64Value(value=3000))))
    err = _error(r.CreateContainer, pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg,
                                                               sandbox_config=pod_cfg))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.linux.security_context.run_as_group" in err.details()
    # With a user (by uid or by name) the group is fine.
    for sc in (pb.LinuxContainerSecurityContext(run_as_group=pb.Int64Value(value=3000),
                                                run_as_user=pb.Int64Value(value=1000)),
               pb.LinuxContainerSecurityContext(run_as_group=pb.Int64Value(value=3000), run_as_username="app")):
        rt.create(pod_id, pod_cfg, f"ok-{len(sc.run_as_username)}", ["true"],
                  linux=pb.LinuxContainerConfig(security_context=sc))

    # The pod's security context: the same rule.
    pod_sc = pb.LinuxSandboxSecurityContext(run_as_group=pb.Int64Value(value=3000))
    err = _error(r.RunPodSandbox, pb.RunPodSandboxRequest(
        config=rt.pod_config("pod-group-only", linux=pb.LinuxPodSandboxConfig(security_context=pod_sc))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.linux.security_context.run_as_group" in err.details()


def test_stop_of_unknown_ids_succeeds(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    assert _code(r.StopContainer, pb.StopContainerRequest(container_id="f" * 64, timeout=1)) is None
    assert _code(r.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id="f" * 64)) is None
    # Also after removal, as kubelet does when it retries a teardown.
    pod_id, pod_cfg = rt.run_pod("stop-gone")
    cid = rt.create(pod_id, pod_cfg, "c", ["true"])
    r.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    r.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    r.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert _code(r.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=1)) is None
    assert _code(r.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id=pod_id)) is None
    # An empty id is still a malformed request.
    assert _code(r.StopContainer, pb.StopContainerRequest(container_id="")) == grpc.StatusCode.INVALID_ARGUMENT


def test_primary_group_is_a_supplementary_group(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("groups")
    sc = pb.LinuxContainerSecurityContext(run_as_user=pb.Int64Value(value=1000),
                                          run_as_group=pb.Int64Value(value=3000), supplemental_groups=[4000])
    cid = _running(rt, pod_id, pod_cfg, "c", ["sleep", "1000"], linux=pb.LinuxContainerConfig(security_context=sc))
    status = exec_sync(rt, cid, ["cat", "/proc/self/status"])[1]
    groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
    assert sorted(int(g) for g in groups) == [3000, 4000], status
    user = rt.client.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1000, 3000, [3000, 4000])
    # Root from the image: groups=0(root), as with containerd and CRI-O.
    root = _running(rt, pod_id, pod_cfg, "root", ["sleep", "1000"])
    status = exec_sync(rt, root, ["cat", "/proc/self/status"])[1]
    assert next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:] == ["0"]


def test_container_with_hugepage_limits_starts(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("hugepages")
    # What kubelet sends for every container: a limit of 0 for each page size the node has.
    res = pb.LinuxContainerResources(hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=0),
                                                      pb.HugepageLimit(page_size="1GB", limit=0)])
    cid = _running(rt, pod_id, pod_cfg, "c", ["sleep", "1000"], linux=pb.LinuxContainerConfig(resources=res))
    assert exec_sync(rt, cid, ["true"])[0] == 0
    # An update carrying them works too.
    rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=512, hugepage_limits=res.hugepage_limits)))


def test_usage_nano_cores_for_every_caller(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    pod_id, pod_cfg = rt.run_pod("nanocores")
    cid = _running(rt, pod_id, pod_cfg, "busy", ["sh", "-c", "while :; do :; done"])
    r.ContainerStats(pb.ContainerStatsRequest(container_id=cid))
    r.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id))
    time.sleep(1.0)  # usage to measure a rate over
    # kubelet's summary API, eviction manager and resource metrics ask at the same moment: each gets the rate.
    calls = [
        r.ContainerStats.future(pb.ContainerStatsRequest(container_id=cid)),
        r.ListContainerStats.future(pb.ListContainerStatsRequest()),
        r.PodSandboxStats.future(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)),
        r.ListPodSandboxStats.future(pb.ListPodSandboxStatsRequest()),
        r.ContainerStats.future(pb.ContainerStatsRequest(container_id=cid)),
    ]
    results = [c.result(timeout=30) for c in calls]
    ctr_stats = [results[0].stats, *results[1].stats, *results[2].stats.linux.containers,
                 *(c for p in results[3].stats for c in p.linux.containers), results[4].stats]
    assert len(ctr_stats) == 5
    for st in ctr_stats:
        assert st.attributes.id == cid
        assert st.cpu.HasField("usage_nano_cores") and st.cpu.usage_nano_cores.value > 0, st
    for pod in (results[2].stats, *results[3].stats):
        assert pod.linux.cpu.HasField("usage_nano_cores") and pod.linux.cpu.usage_nano_cores.value > 0, pod
