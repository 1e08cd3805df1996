"""The pause task of a pod that shares one PID namespace, forked by the runc shim (shims/runc/pause.py).

Checked from inside real runc containers of the pod (what a hostile workload could try) and from the
host: the process holds nothing a container does not, reaches no host file, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.support.procs import shim_pids
from tests.support.runtime import Runtime, exec_sync


def _shared_pid_pod(rt: Runtime, name: str, cgroup_parent: str = "") -> tuple[str, object, int]:
    pb = rt.pb
    sc = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))
    pod_id, pod_cfg = rt.run_pod(name, linux=pb.LinuxPodSandboxConfig(security_context=sc,
                                                                      cgroup_parent=cgroup_parent))
    info = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info
    return pod_id, pod_cfg, json.loads(info["info"])["pid"]


def _container(rt: Runtime, pod_id: str, pod_cfg: object, name: str, caps: list[str] | None = None) -> str:
    pb = rt.pb
    sc = pb.LinuxContainerSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD),
                                          capabilities=pb.Capability(add_capabilities=caps or []))
    cid = rt.create(pod_id, pod_cfg, name, ["sleep", "3600"], linux=pb.LinuxContainerConfig(security_context=sc))
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    return cid


def _status_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _shim_log(rt: Runtime, pod_id: str) -> list[dict[str, object]]:
    path = rt.proc.state / "pods" / pod_id / "pause" / "shim.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        status = Path(f"/proc/{pid}/status").read_text() if os.path.exists(f"/proc/{pid}/status") else ""
        if "State:\tZ" in status or time.monotonic() > deadline:
            return "State:\tZ" in status
        time.sleep(0.05)
    return True


def test_pause_task_holds_nothing_a_container_could_use(rt: Runtime) -> None:
    pod_id, pod_cfg, pause_pid = _shared_pid_pod(rt, "pause-sec")
    # Named from its fork on: between Create's answer and its exec it must not pass for the shim.
    assert Path(f"/proc/{pause_pid}/comm").read_text().strip() == "pause"
    created = [e for e in _shim_log(rt, pod_id) if e.get("event") == "created"]
    assert created and created[0]["runtime"] == "shim", created  # forked by the shim, not `runc run`
    # A container with CAP_SYS_PTRACE may look through /proc/1: it must find only the pause rootfs.
    tracer = _container(rt, pod_id, pod_cfg, "tracer", caps=["SYS_PTRACE"])
    code, out, err = exec_sync(rt, tracer, ["cat", "/proc/1/status"])
    assert code == 0, err
    st = _status_fields(out)
    assert st["Name"] == "pause" or "catatonit" in st["Name"], st
    assert st["Uid"].split() == ["65535"] * 4 and st["Gid"].split() == ["65535"] * 4, st
    assert st["Groups"] == "", st
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[field], 16) == 0, (field, st)
    assert st["NoNewPrivs"] == "1", st
    code, mountinfo, err = exec_sync(rt, tracer, ["cat", "/proc/1/mountinfo"])
    assert code == 0, err
    lines = mountinfo.splitlines()
    assert len(lines) == 1 and lines[0].split()[4] == "/" and " ro," in f" {lines[0].split()[5]},", mountinfo
    # Its root is its own mount: ".." from it stays there, whatever the path it is reached by.
    code, listing, err = exec_sync(rt, tracer, ["ls", "-a", "/proc/1/root/", "/proc/1/root/../../../"])
    assert code == 0, err
    names = {n for n in listing.split() if not n.endswith(":") and n not in (".", "..")}
    assert names <= {"pause", "proc", "dev"}, listing
    code, _, _ = exec_sync(rt, tracer, ["cat", "/proc/1/root/../../../../etc/os-release"])
    assert code != 0
    code, _, _ = exec_sync(rt, tracer, ["touch", "/proc/1/root/planted"])
    assert code != 0, "the pause rootfs must be read-only"
    # It is in the pod's network namespace, like the container.
    code, out, err = exec_sync(rt, tracer, ["sh", "-c", "readlink /proc/1/ns/net; readlink /proc/self/ns/net"])
    assert code == 0, err
    assert len(out.split()) == 2 and len(set(out.split())) == 1, out
    # Without CAP_SYS_PTRACE, a root container cannot even look (another uid).
    plain = _container(rt, pod_id, pod_cfg, "plain")
    code, _, err = exec_sync(rt, plain, ["ls", "/proc/1/root/"])
    assert code != 0 and "denied" in err, err
    # From the host: the pause is the shim's child, in the pod's cgroup, PID 1 of its own PID namespace.
    host_status = _status_fields(Path(f"/proc/{pause_pid}/status").read_text())
    assert host_status["NSpid"].split()[-1] == "1", host_status
    cgroup = Path(f"/proc/{pause_pid}/cgroup").read_text()
    memory = next(line for line in cgroup.splitlines() if ":memory:" in line)
    assert memory.endswith(f"/{pod_id}"), cgroup
    cgroup_dir = Path("/sys/fs/cgroup/memory") / memory.split(":", 2)[2].lstrip("/")
    assert cgroup_dir.is_dir()
    shim_pid = int(host_status["PPid"])
    # shimd's default shim for runc handlers is the compiled one.
    assert shim_pid in shim_pids(pod_id)
    assert "shimd-runc-shim" in Path(f"/proc/{shim_pid}/cmdline").read_bytes().decode(errors="replace")

    pb = rt.pb
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert _gone(pause_pid)
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not cgroup_dir.exists(), "the pause task's cgroup must be removed with the pod"


def test_pause_task_dies_with_its_shim(rt: Runtime) -> None:
    # Under a cgroup parent that kubelet owns (shimd removes only the pod's own cgroups from it).
    parent = f"/shimd-test-kubepods-{os.getpid()}"
    pod_id, pod_cfg, pause_pid = _shared_pid_pod(rt, "pause-shim-death", cgroup_parent=parent)
    cid = _container(rt, pod_id, pod_cfg, "c")
    container_pid = int(json.loads(rt.client.runtime.ContainerStatus(rt.pb.ContainerStatusRequest(
        container_id=cid, verbose=True)).info["info"])["pid"])
    shim_pid = int(_status_fields(Path(f"/proc/{pause_pid}/status").read_text())["PPid"])
    os.kill(shim_pid, signal.SIGKILL)
    # The pause dies with its shim (parent-death signal), and with it, as PID 1, its PID namespace.
    assert _gone(pause_pid)
    assert _gone(container_pid)
    pb = rt.pb
    deadline = time.monotonic() + 20
    while rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.state \
            != pb.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "the pod of a dead shim must be reported NOTREADY"
        time.sleep(0.1)
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    try:
        left = [str(p) for p in Path(f"/sys/fs/cgroup/memory{parent}").rglob("*") if p.is_dir()]
        assert not left, f"cgroups left under the parent by the dead shim's pods: {left}"
    finally:
        for root in Path("/sys/fs/cgroup").iterdir():
            for d in sorted(root.glob(f"{parent.lstrip('/')}/**/"), key=lambda p: -len(str(p))):
                d.rmdir()
