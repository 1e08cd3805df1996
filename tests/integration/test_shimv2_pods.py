"""Pods through a real containerd shim v2 binary (Debian's containerd-shim-runc-v2; Kata's when installed):
full lifecycle with CRI logs via binary://, exec over FIFOs, stop, remove and shimd restart recovery."""

from __future__ import annotations

import os
import time

import pytest

from tests.integration.test_pod_lifecycle import CRI_LINE, _procs_mentioning, assert_no_leftovers
from tests.support.runtime import Runtime
from tests.support.runtime import exec_sync as _exec
from tests.support.runtime import wait_log as _wait_log
from tests.support.sandboxed import shimv2_params


def _shims_of(pod_id: str) -> list[int]:
    return [p for p in _procs_mentioning(pod_id) if b"containerd-shim" in open(f"/proc/{p}/cmdline", "rb").read()]


@pytest.mark.parametrize("handler", shimv2_params())
def test_shimv2_pod_lifecycle(rt_sandboxed: Runtime, handler: str) -> None:
    rt, pb = rt_sandboxed, rt_sandboxed.pb
    pod_id, pod_cfg = rt.run_pod("v2", handler=handler)
    st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert st.status.state == pb.SANDBOX_READY and st.status.runtime_handler == handler
    assert len(_shims_of(pod_id)) == 1

    cid = rt.create(pod_id, pod_cfg, "app", ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    log = _wait_log(rt.log_dir / "v2" / "app" / "0.log", "hello-err")
    parsed = [CRI_LINE.match(line) for line in log.splitlines()]
    assert parsed and all(parsed), log
    assert {("stdout", "hello-out"), ("stderr", "hello-err")} <= {(m.group(3), m.group(5)) for m in parsed if m}

    code, out, err = _exec(rt, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, "out\n", "err\n")
    code, out, _ = _exec(rt, cid, ["cat", "/etc/hostname"])
    assert code == 0 and out.strip() == "v2"

    # A second container shares the pod's shim.
    quitter = rt.create(pod_id, pod_cfg, "quitter", ["sh", "-c", "echo bye; exit 7"])
    rt.start(quitter)
    assert rt.wait_state(quitter, pb.CONTAINER_EXITED).exit_code == 7
    assert "bye" in _wait_log(rt.log_dir / "v2" / "quitter" / "0.log", "bye")
    assert len(_shims_of(pod_id)) == 1

    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10))
    st = rt.status(cid)
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 128 + 15
    rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=quitter))
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert _shims_of(pod_id) == []
    assert_no_leftovers(rt, pod_id)


@pytest.mark.parametrize("handler", shimv2_params())
def test_shimv2_restart_recovery_and_logging_while_down(rt_sandboxed: Runtime, handler: str) -> None:
    rt, pb = rt_sandboxed, rt_sandboxed.pb
    pod_id, pod_cfg = rt.run_pod("v2r", handler=handler)
    ticker = rt.create(pod_id, pod_cfg, "ticker", ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); "
                                                              "sleep 0.2; done"])
    quitter = rt.create(pod_id, pod_cfg, "quitter", ["sh", "-c", "sleep 2; exit 5"])
    rt.start(ticker)
    rt.start(quitter)
    rt.wait_state(ticker, pb.CONTAINER_RUNNING)
    log = rt.log_dir / "v2r" / "ticker" / "0.log"
    _wait_log(log, "tick-1")

    rt.proc.kill()
    time.sleep(3.5)  # quitter exits and ticker keeps logging while shimd is down
    lines_while_down = len(log.read_text().splitlines())
    rt.proc.start()

    assert lines_while_down >= 10
    assert rt.wait_state(quitter, pb.CONTAINER_EXITED, timeout=15).exit_code == 5
    assert rt.status(ticker).state == pb.CONTAINER_RUNNING
    code, out, _ = _exec(rt, ticker, ["echo", "still-here"])
    assert (code, out) == (0, "still-here\n")

    # Rotation as kubelet does it: rename, then ReopenContainerLog; new lines go to a new file.
    os.rename(log, str(log) + ".1")
    rt.client.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=ticker))
    assert "tick-" in _wait_log(log, "tick-", timeout=10)

    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert rt.status(ticker).state == pb.CONTAINER_EXITED
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert _shims_of(pod_id) == []
    assert_no_leftovers(rt, pod_id)


@pytest.mark.parametrize("handler", shimv2_params())
def test_shimv2_dead_shim_is_detected_and_cleaned(rt_sandboxed: Runtime, handler: str) -> None:
    import signal

    rt, pb = rt_sandboxed, rt_sandboxed.pb
    pod_id, pod_cfg = rt.run_pod("v2dead", handler=handler)
    cid = rt.create(pod_id, pod_cfg, "sleeper", ["sleep", "1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    shims = _shims_of(pod_id)
    assert len(shims) == 1
    os.kill(shims[0], signal.SIGKILL)
    assert rt.wait_state(cid, pb.CONTAINER_EXITED, timeout=15).reason == "ShimDied"
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)
