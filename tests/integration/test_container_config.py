"""What a container sees: command/env/workdir merge, mounts, pod files, shared PID namespace, log rotation."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import pytest

from tests.support.runtime import Runtime


def _exec(rt: Runtime, cid: str, *cmd: str) -> str:
    res = rt.client.runtime.ExecSync(rt.pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=20))
    assert res.exit_code == 0, (cmd, res.stdout, res.stderr)
    return res.stdout.decode()


def test_env_workdir_mounts_and_pod_files(rt: Runtime, tmp_path: Path) -> None:
    pb = rt.pb
    host_dir = tmp_path / "shared"
    host_dir.mkdir()
    (host_dir / "hello.txt").write_text("from-host\n")
    pod_id, pod_cfg = rt.run_pod("cfg", hostname="cfg-host",
                                 dns_config=pb.DNSConfig(servers=["10.9.8.7"], searches=["example.test"],
                                                         options=["ndots:3"]))
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "1000"], working_dir="/tmp",
                    envs=[pb.KeyValue(key="GREETING", value=b"hi there")],
                    mounts=[pb.Mount(container_path="/data", host_path=str(host_dir), readonly=True)])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    assert _exec(rt, cid, "sh", "-c", "echo $GREETING").strip() == "hi there"
    assert _exec(rt, cid, "pwd").strip() == "/tmp"
    assert _exec(rt, cid, "cat", "/data/hello.txt") == "from-host\n"
    res = rt.client.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["touch", "/data/x"], timeout=10))
    assert res.exit_code != 0, "a readonly bind mount must refuse writes"
    assert _exec(rt, cid, "hostname").strip() == "cfg-host"
    resolv = _exec(rt, cid, "cat", "/etc/resolv.conf")
    assert "nameserver 10.9.8.7" in resolv and "search example.test" in resolv and "ndots:3" in resolv
    assert "localhost" in _exec(rt, cid, "cat", "/etc/hosts")  # no pod IP on a loopback-only network
    # The writable layer is the container's own.
    _exec(rt, cid, "sh", "-c", "echo scratch > /scratch.txt")
    status = rt.client.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True))
    assert [m.container_path for m in status.status.mounts] == ["/data"]
    assert "writableLayer" in status.info["info"]


def test_shared_pid_namespace_uses_a_pause_process(rt: Runtime) -> None:
    pb = rt.pb
    sc = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))
    pod_id, pod_cfg = rt.run_pod("sharedpid", linux=pb.LinuxPodSandboxConfig(security_context=sc))
    ctr_sc = pb.LinuxContainerSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))
    a = rt.create(pod_id, pod_cfg, "a", ["sleep", "4242"], linux=pb.LinuxContainerConfig(security_context=ctr_sc))
    b = rt.create(pod_id, pod_cfg, "b", ["sleep", "1000"], linux=pb.LinuxContainerConfig(security_context=ctr_sc))
    rt.start(a)
    rt.start(b)
    rt.wait_state(b, pb.CONTAINER_RUNNING)
    ps = _exec(rt, b, "ps", "-o", "pid,args")
    assert "sleep 4242" in ps, ps
    first = ps.splitlines()[1].split(None, 1)
    assert first[0] == "1" and "pause" in first[1], ps


def test_container_pid_namespace_private_as_kubelet_asks(rt: Runtime) -> None:
    pb = rt.pb
    # kubelet always spells the modes out: CONTAINER unless shareProcessNamespace or hostPID.
    sc = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.CONTAINER))
    pod_id, pod_cfg = rt.run_pod("privpid", linux=pb.LinuxPodSandboxConfig(security_context=sc))
    ctr = pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)))
    a = rt.create(pod_id, pod_cfg, "a", ["sleep", "4243"], linux=ctr)
    b = rt.create(pod_id, pod_cfg, "b", ["sleep", "1000"], linux=ctr)
    rt.start(a)
    rt.start(b)
    rt.wait_state(b, pb.CONTAINER_RUNNING)
    assert "sleep 4243" not in _exec(rt, b, "ps")


def test_long_lines_are_split_and_log_reopens(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("logs")
    script = ("head -c 40000 /dev/zero | tr '\\0' x; echo; echo before; sleep 3; echo after; sleep 1000")
    cid = rt.create(pod_id, pod_cfg, "c", ["sh", "-c", script])
    rt.start(cid)
    log = Path(rt.status(cid).log_path)
    deadline = time.monotonic() + 10
    while "before" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    tags = [line.split(" ", 3)[2] for line in lines]
    assert "P" in tags, "a 40000-byte line must be written in partial pieces"
    whole = "".join(line.split(" ", 3)[3] for line in lines if line.split(" ", 3)[1] == "stdout"
                    and "before" not in line)
    assert whole == "x" * 40000
    # kubelet's rotation: rename, then ask the runtime to reopen.
    rotated = log.with_name("0.log.1")
    os.rename(log, rotated)
    rt.client.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    deadline = time.monotonic() + 10
    while not (log.exists() and "after" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(r" stdout F after$", log.read_text(), re.M)
    assert "after" not in rotated.read_text()


def test_reopen_log_of_stopped_container_is_refused(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("reopen")
    cid = rt.create(pod_id, pod_cfg, "c", ["true"])
    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_devices_and_list_filters(rt: Runtime) -> None:
    pb = rt.pb
    pod_a, cfg_a = rt.run_pod("filt-a", labels={"team": "a"})
    pod_b, cfg_b = rt.run_pod("filt-b", labels={"team": "b"})
    cid = rt.create(pod_a, cfg_a, "dev", ["sleep", "1000"], labels={"role": "dev"},
                    devices=[pb.Device(container_path="/dev/xnull", host_path="/dev/null", permissions="rw")])
    other = rt.create(pod_b, cfg_b, "plain", ["true"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    _exec(rt, cid, "sh", "-c", "test -c /dev/xnull && echo data > /dev/xnull")

    r = rt.client.runtime
    sel = r.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(label_selector={"team": "b"}))).items
    assert [p.id for p in sel] == [pod_b]
    ready = r.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
        state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY)))).items
    assert {p.id for p in ready} >= {pod_a, pod_b}
    by_prefix = r.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(id=pod_a[:12]))).items
    assert [p.id for p in by_prefix] == [pod_a]
    running = r.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)))).containers
    assert [c.id for c in running] == [cid]
    created = r.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        state=pb.ContainerStateValue(state=pb.CONTAINER_CREATED)))).containers
    assert [c.id for c in created] == [other]
    labelled = r.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
        label_selector={"role": "dev"}))).containers
    assert [c.id for c in labelled] == [cid]
    # A short id prefix works wherever an id is taken, as crictl users expect.
    assert rt.status(cid[:12]).id == cid
