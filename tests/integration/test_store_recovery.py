"""Issue 16 item 8 on the real daemon: StopContainer and UpdateContainerResources racing the container's exit,
and records that cannot be parsed at start-up."""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.procs import alive, shim_pids
from tests.support.runtime import Runtime

PTRACE_SEIZE = 0x4206
WALL = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _container_pids(cid: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    if cid in f.read():
                        out.append(int(pid))
            except OSError:
                continue
    return out


def _until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.02)


class HeldExit:
    """Kills the container's init while this process traces it: it stays a zombie its shim cannot reap
    (a tracer is told of the exit first) until release(). runc meanwhile sees the container stopped, the
    shim still sees it running: the window a racing stop or update falls into, held open."""

    def __init__(self, rt: Runtime, cid: str) -> None:
        (self.pid,) = _container_pids(cid)
        self.log = rt.proc.state / "containers" / cid / "log.json"
        self.released = False
        if _libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(self.pid), None, None) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_SEIZE")
        os.kill(self.pid, signal.SIGKILL)
        _until(lambda: not alive(self.pid), "the init is a zombie")

    def runc_refused(self) -> bool:
        try:
            return "not running" in self.log.read_text()
        except OSError:
            return False

    def release(self) -> None:
        if not self.released:
            self.released = True
            os.waitpid(self.pid, WALL)  # the tracer's wait: now the shim is told, and reaps it


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(2) as p:
        yield p


def test_stop_racing_the_exit_succeeds(rt: Runtime, pool: concurrent.futures.ThreadPoolExecutor) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("stoprace")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "1000"])
    rt.start(cid)
    held = HeldExit(rt, cid)
    try:
        stop = pool.submit(rt.client.runtime.StopContainer, pb.StopContainerRequest(container_id=cid, timeout=10))
        # The runc shim signals an unreaped init with kill(2), which a zombie takes silently; runc (other
        # handlers, older shims) refuses: either way the stop is in flight while the exit is held.
        sent = time.monotonic() + 1.0
        _until(lambda: held.runc_refused() or stop.done() or time.monotonic() > sent, "the stop signal was sent")
        held.release()
        stop.result(timeout=60)  # old code: INTERNAL "runc kill failed: container not running"
    finally:
        held.release()
    st = rt.wait_state(cid, pb.CONTAINER_EXITED)
    assert st.exit_code == 137


def test_update_racing_the_exit_is_failed_precondition(rt: Runtime,
                                                      pool: concurrent.futures.ThreadPoolExecutor) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("updrace")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "1000"])
    rt.start(cid)
    held = HeldExit(rt, cid)
    try:
        update = pool.submit(rt.client.runtime.UpdateContainerResources, pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=512)))
        with pytest.raises(grpc.RpcError) as e:
            update.result(timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    finally:
        held.release()
    rt.wait_state(cid, pb.CONTAINER_EXITED)
    # After the exit is recorded, too.
    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=512)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()


def _cut_short(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def test_unreadable_records_are_kept_aside_and_what_they_owned_is_cleaned_up(rt: Runtime) -> None:
    pb = rt.pb
    lost_pod, lost_cfg = rt.run_pod("lostpod")
    in_lost = rt.create(lost_pod, lost_cfg, "c", ["sleep", "1000"])
    rt.start(in_lost)
    kept_pod, kept_cfg = rt.run_pod("keptpod")
    lost_ctr = rt.create(kept_pod, kept_cfg, "lost", ["sleep", "1000"])
    rt.start(lost_ctr)
    kept_ctr = rt.create(kept_pod, kept_cfg, "kept", ["sleep", "1000"])
    rt.start(kept_ctr)
    procs: dict[str, Any] = {c: _container_pids(c) for c in (in_lost, lost_ctr, kept_ctr)}
    (shim_of_lost,) = shim_pids(lost_pod)
    root, state = rt.proc.root, rt.proc.state

    rt.proc.kill()
    _cut_short(root / "pods" / f"{lost_pod}.json")
    _cut_short(root / "containers" / f"{lost_ctr}.json")
    rt.proc.start()

    assert [p.id for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [kept_pod]
    assert sorted(c.id for c in rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers) == [
        kept_ctr]
    assert rt.status(kept_ctr).state == pb.CONTAINER_RUNNING
    # Kept aside for inspection, named by `shimd check`.
    assert (root / "pods" / f"{lost_pod}.json.unreadable").exists()
    assert (root / "containers" / f"{lost_ctr}.json.unreadable").exists()
    # What they owned is gone: processes, shim, namespace pins, bundles, writable layers, records.
    for cid in (in_lost, lost_ctr):
        assert not any(alive(p) for p in procs[cid]), cid
        assert not (state / "containers" / cid).exists()
        assert not (root / "rw" / cid).exists()
    assert all(alive(p) for p in procs[kept_ctr])
    assert not alive(shim_of_lost)
    assert not (state / "ns" / lost_pod).exists()
    assert not (state / "pods" / lost_pod).exists()
    assert not (root / "containers" / f"{in_lost}.json").exists()
    assert not (root / "pods" / f"{lost_pod}.json").exists()
    # Nothing is left to do at the next start.
    rt.proc.stop()
    rt.proc.start()
    assert [p.id for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [kept_pod]


def test_records_of_an_older_shimd_are_upgraded_at_start(rt: Runtime) -> None:
    """Issue 17: a pod record with the old READY/NOTREADY-plus-flags form and a container record without the
    user (which the CRI layer used to read from the bundle at every status) are read, and the user comes
    from the bundle once, at start."""
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("older")
    sc = pb.LinuxContainerSecurityContext(run_as_user=pb.Int64Value(value=1000),
                                          run_as_group=pb.Int64Value(value=3000))
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "1000"], linux=pb.LinuxContainerConfig(security_context=sc))
    rt.start(cid)
    root = rt.proc.root
    rt.proc.kill()
    pod_file, ctr_file = root / "pods" / f"{pod_id}.json", root / "containers" / f"{cid}.json"
    pod = json.loads(pod_file.read_text())
    pod.update(state="READY", initializing=False, stopped=False)
    pod_file.write_text(json.dumps(pod))
    ctr = json.loads(ctr_file.read_text())
    assert ctr.pop("user") == {"uid": 1000, "gid": 3000, "groups": [3000]}
    ctr_file.write_text(json.dumps(ctr))
    rt.proc.start()

    user = rt.status(cid).user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1000, 3000, [3000])
    assert json.loads(ctr_file.read_text())["user"] == {"uid": 1000, "gid": 3000, "groups": [3000]}
    (item,) = rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id=pod_id))).items
    assert item.state == pb.SANDBOX_READY
    assert rt.status(cid).state == pb.CONTAINER_RUNNING


def test_namespaces_that_no_record_names_are_removed_at_start(rt: Runtime) -> None:
    """RunPodSandbox pins a pod's namespaces while its first record is written: a crash between the two
    leaves pins that no record names, which the next start removes (the known pod's stay)."""
    import asyncio

    from shimd.network import namespaces as ns

    pb = rt.pb
    kept, _ = rt.run_pod("kept")
    state = rt.proc.state
    rt.proc.kill()
    orphan = "0d" * 32
    asyncio.run(ns.create_pod_namespaces(orphan, state / "ns", ["network", "uts", "ipc"], "orphan"))
    pins = [str(state / "ns" / orphan / k) for k in ("network", "uts", "ipc")]
    assert all(ns.namespace_alive(p) for p in pins)
    rt.proc.start()

    assert not (state / "ns" / orphan).exists()
    mounted = Path("/proc/self/mountinfo").read_text()
    assert not [p for p in pins if f" {p} " in mounted]
    assert ns.namespace_alive(str(state / "ns" / kept / "network"))
    (item,) = rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert item.id == kept and item.state == pb.SANDBOX_READY
