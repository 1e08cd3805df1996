"""Pods and containers on real runc through the independent grpcio client."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.support.procs import procs_for_pod, shim_pids
from tests.support.runtime import Runtime

CRI_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)) (stdout|stderr) ([FP]) (.*)$")


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(str(base))]


def _procs_mentioning(text: str) -> list[int]:
    return procs_for_pod(text)


def _describe(pid: int) -> bytes:
    """A process's command line (or, for a forked shim, its name), for assertion messages."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ")[:300]
    with open(f"/proc/{pid}/comm", "rb") as f:
        return cmdline or f.read()


def _cgroup_dirs(pod_id: str) -> list[str]:
    out = []
    for root in Path("/sys/fs/cgroup").iterdir():
        d = root / "shimd" / f"pod{pod_id[:16]}"
        if d.exists():
            out.append(str(d))
    return out


def assert_no_leftovers(rt: Runtime, pod_id: str) -> None:
    base = rt.proc.base
    # The pin directory's own private bind mount (like /run/netns) lives as long as shimd.
    assert [m for m in _mounts_under(base) if m != str(rt.proc.state / "ns")] == [], "mounts left behind"
    ns_dir = rt.proc.state / "ns"
    assert not ns_dir.exists() or list(ns_dir.iterdir()) == [], "namespace pins left behind"
    assert _cgroup_dirs(pod_id) == [], "cgroups left behind"
    left = {p: _describe(p) for p in _procs_mentioning(pod_id)}
    assert left == {}, "shim or container processes left behind"
    for d in (rt.proc.root / "pods", rt.proc.root / "containers", rt.proc.state / "pods",
              rt.proc.state / "containers"):
        assert not d.exists() or list(d.iterdir()) == [], f"state left in {d}"


def test_lifecycle_logs_exit_code_and_cleanup(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("life")
    st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert st.status.state == pb.SANDBOX_READY
    assert st.status.metadata.name == "life"
    assert "info" in st.info

    cid = rt.create(pod_id, pod_cfg, "writer", ["sh", "-c", "echo hello-out; echo hello-err >&2; exit 3"])
    assert rt.status(cid).state == pb.CONTAINER_CREATED
    rt.start(cid)
    status = rt.wait_state(cid, pb.CONTAINER_EXITED)
    assert status.exit_code == 3
    assert status.reason == "Error"
    assert status.started_at > 0 and status.finished_at >= status.started_at
    assert status.image.image == rt.image
    assert status.image_ref.startswith(rt.image.split(":")[0]) or status.image_ref.startswith("sha256:")

    log_path = Path(status.log_path)
    assert log_path == rt.log_dir / "life" / "writer" / "0.log"
    lines = log_path.read_text().splitlines()
    parsed = [CRI_LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = {(m.group(3), m.group(5)) for m in parsed if m}
    assert ("stdout", "hello-out") in got and ("stderr", "hello-err") in got

    # A container that ignores SIGTERM is killed after the timeout.
    cid2 = rt.create(pod_id, pod_cfg, "stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"])
    rt.start(cid2)
    rt.wait_state(cid2, pb.CONTAINER_RUNNING)
    t0 = time.monotonic()
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid2, timeout=2))
    elapsed = time.monotonic() - t0
    st2 = rt.status(cid2)
    assert st2.state == pb.CONTAINER_EXITED
    assert st2.exit_code == 128 + signal.SIGKILL
    assert 1.5 <= elapsed < 15

    listed = rt.client.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod_id))).containers
    assert {c.id for c in listed} == {cid, cid2}
    # user_specified_image is echoed as kubelet sent it, and stays empty when it was not sent.
    assert {c.image.user_specified_image for c in listed} == {""}
    typed_cfg = rt.container_config("typed", ["true"])
    typed_cfg.image.user_specified_image = "busybox:as-typed"
    typed = rt.client.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=typed_cfg, sandbox_config=pod_cfg)).container_id
    assert rt.status(typed).image.user_specified_image == "busybox:as-typed"
    listed = rt.client.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(id=typed))).containers
    assert [c.image.user_specified_image for c in listed] == ["busybox:as-typed"]

    pins = rt.proc.state / "ns" / pod_id
    assert {"network", "ipc", "uts"} <= {p.name for p in pins.iterdir()}
    assert _cgroup_dirs(pod_id)
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    # Nothing of the pod runs once it is stopped: its cgroups and the namespaces CNI DEL does not enter
    # went with StopPodSandbox; the network namespace stays until RemovePodSandbox.
    assert {p.name for p in pins.iterdir()} == {"network"}
    assert _cgroup_dirs(pod_id) == []
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent
    st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert st.status.state == pb.SANDBOX_NOTREADY
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))  # idempotent
    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    assert_no_leftovers(rt, pod_id)


def test_restart_recovery(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("recover")
    runner = rt.create(pod_id, pod_cfg, "runner", ["sleep", "1000"])
    quitter = rt.create(pod_id, pod_cfg, "quitter", ["sh", "-c", "sleep 2; exit 7"])
    rt.start(runner)
    rt.start(quitter)
    rt.wait_state(runner, pb.CONTAINER_RUNNING)

    rt.proc.kill()  # SIGKILL: the shim and containers must not notice
    time.sleep(3.5)  # quitter exits while shimd is down
    rt.proc.start()

    st = rt.wait_state(quitter, pb.CONTAINER_EXITED, timeout=10)
    assert st.exit_code == 7
    assert rt.status(runner).state == pb.CONTAINER_RUNNING
    pods = rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert [p.id for p in pods] == [pod_id]
    assert pods[0].state == pb.SANDBOX_READY

    # The recovered shim still drives its containers.
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=runner, timeout=1))
    assert rt.status(runner).state == pb.CONTAINER_EXITED
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_dead_shim_is_detected_and_cleaned(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("shimdeath")
    cid = rt.create(pod_id, pod_cfg, "sleeper", ["sleep", "1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    info = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    shims = shim_pids(pod_id)
    assert shims, info.info
    for p in shims:
        os.kill(p, signal.SIGKILL)
    st = rt.wait_state(cid, pb.CONTAINER_EXITED, timeout=15)
    assert st.reason == "ShimDied"
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def _code(fn, *args) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code()


def test_bad_input(rt: Runtime) -> None:
    pb, r = rt.pb, rt.client.runtime
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    assert _code(r.RunPodSandbox, pb.RunPodSandboxRequest()) == INVALID
    assert _code(r.RunPodSandbox, pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(hostname="x"))) == INVALID
    bad_name = rt.pod_config("a/b")
    assert _code(r.RunPodSandbox, pb.RunPodSandboxRequest(config=bad_name)) == INVALID
    e_handler = _code(r.RunPodSandbox, pb.RunPodSandboxRequest(config=rt.pod_config("h"), runtime_handler="nope"))
    assert e_handler == INVALID

    pod_id, pod_cfg = rt.run_pod("bad")
    assert _code(r.RunPodSandbox, pb.RunPodSandboxRequest(config=pod_cfg)) == grpc.StatusCode.ALREADY_EXISTS

    def create(cfg, pid=pod_id):  # type: ignore[no-untyped-def]
        return r.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pid, config=cfg, sandbox_config=pod_cfg))

    assert _code(create, pb.ContainerConfig(image=pb.ImageSpec(image=rt.image))) == INVALID  # no metadata
    assert _code(create, rt.container_config("x/y", ["true"])) == INVALID
    assert _code(create, rt.container_config("ok", ["true"]), "f" * 64) == NOT_FOUND
    not_pulled = rt.container_config("np", ["true"])
    not_pulled.image.image = "127.0.0.1:1/never/pulled:1"
    assert _code(create, not_pulled) == NOT_FOUND
    escaping = rt.container_config("esc", ["true"])
    escaping.log_path = "../../etc/evil.log"
    assert _code(create, escaping) == INVALID

    cid = create(rt.container_config("dup", ["true"])).container_id
    assert _code(create, rt.container_config("dup", ["true"])) == grpc.StatusCode.ALREADY_EXISTS
    assert _code(r.StartContainer, pb.StartContainerRequest(container_id="0" * 64)) == NOT_FOUND
    assert _code(r.ContainerStatus, pb.ContainerStatusRequest(container_id="0" * 64)) == NOT_FOUND
    assert _code(r.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=-1)) == INVALID

    r.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert _code(create, rt.container_config("late", ["true"])) == grpc.StatusCode.FAILED_PRECONDITION
    r.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    # Removing twice and removing unknown containers is fine (CRI idempotency).
    r.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert_no_leftovers(rt, pod_id)
