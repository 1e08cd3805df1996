"""SIGKILL a pod's shim: its containers report exited with a reason, and cleanup still works."""

from __future__ import annotations

import os
import signal
import time

from tests.support.procs import shim_pids
from tests.support.reliability import Checker, explain
from tests.support.runtime import Runtime


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_shim_sigkill_live_and_while_shimd_is_down(rt: Runtime) -> None:
    pb = rt.pb
    checker = Checker(rt)
    # A: the shim dies while shimd watches. B: the shim dies while shimd is down.
    pods = {}
    for name in ("live", "down"):
        pod_id, cfg = rt.run_pod(name)
        sleeper = rt.create(pod_id, cfg, "sleeper", ["sleep", "1000"])
        idle = rt.create(pod_id, cfg, "idle", ["sleep", "1000"])  # never started
        rt.start(sleeper)
        rt.wait_state(sleeper, pb.CONTAINER_RUNNING)
        pods[name] = (pod_id, sleeper, idle)

    pid_a = shim_pids(pods["live"][0])
    assert len(pid_a) == 1, pid_a
    os.kill(pid_a[0], signal.SIGKILL)
    wait_gone(pid_a[0])

    rt.proc.kill()
    pid_b = shim_pids(pods["down"][0])
    assert len(pid_b) == 1, pid_b
    os.kill(pid_b[0], signal.SIGKILL)
    wait_gone(pid_b[0])
    rt.proc.start()

    for pod_id, sleeper, idle in pods.values():
        st = rt.wait_state(sleeper, pb.CONTAINER_EXITED, timeout=20)
        assert st.reason, "an exit caused by a dead shim must say why"
        assert st.finished_at >= st.started_at > 0
        assert rt.status(idle).state == pb.CONTAINER_CREATED
        pst = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert pst.state == pb.SANDBOX_NOTREADY
        # A pod whose shim is gone accepts no new work, with a clear status rather than a hang.
        try:
            rt.start(idle)
        except Exception as e:  # grpc.RpcError
            assert "FAILED_PRECONDITION" in str(e) or "UNAVAILABLE" in str(e), e
        else:
            raise AssertionError("StartContainer in a pod with a dead shim succeeded")

    problems = checker.check()
    assert not problems, explain(rt, problems)
    for pod_id, _, _ in pods.values():
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    problems = checker.check_empty()
    assert not problems, explain(rt, problems)
