"""The shim zygote: pods get Python shims forked from it, and pods still start when it is gone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import ShimdProcess
from tests.support.procs import shim_pids
from tests.support.runtime import Runtime, started_runtime


@pytest.fixture
def rt(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
       cni_loopback_dir: Path) -> Iterator[Runtime]:
    """Pods under the Python shim: the compiled one is exec'd, never forked from the zygote."""
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir,
                         '[handlers.runc]\nshim = "python"\n') as runtime:
        yield runtime


def _zygotes(rt: Runtime) -> list[int]:
    sock = str(rt.proc.state / "s" / "zygote").encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                comm = _comm(int(pid))
            except OSError:
                continue
            # Forked shims share the zygote's command line, and so does a pod's pause task until its exec
            # (shims/runc/pause.py): their names tell them apart.
            if b"shims.runc.zygote" in argv and sock in argv and not comm.startswith("shim-") and comm != "pause":
                found.append(int(pid))
    return found


def _zygotes_after_last_pod(rt: Runtime, pod: str, timeout: float) -> list[int]:
    """Removes the last pod and stops shimd; the zygotes still there once they are gone or `timeout` passed."""
    pb = rt.pb
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod))
    rt.proc.stop()
    deadline = time.monotonic() + timeout
    while _zygotes(rt) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _zygotes(rt)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_shims_come_from_the_zygote_and_survive_its_loss(rt: Runtime) -> None:
    pb = rt.pb
    pod_a, cfg_a = rt.run_pod("zyg-a")
    zygotes = _zygotes(rt)
    assert len(zygotes) == 1, "the first pod starts one zygote"
    shims = shim_pids(pod_a)
    assert len(shims) == 1 and _comm(shims[0]) == f"shim-{pod_a[:10]}"

    os.kill(zygotes[0], signal.SIGKILL)
    time.sleep(0.2)
    # A pod still starts (directly, or from a new zygote) and its containers run.
    pod_b, cfg_b = rt.run_pod("zyg-b")
    cid = rt.create(pod_b, cfg_b, "c", ["sh", "-c", "echo zygote-ok; sleep 1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    assert len(shim_pids(pod_b)) == 1
    # The shim forked before the zygote died is unaffected.
    cid_a = rt.create(pod_a, cfg_a, "c", ["sleep", "1000"])
    rt.start(cid_a)
    rt.wait_state(cid_a, pb.CONTAINER_RUNNING)

    # A restarted shimd reuses a live zygote rather than starting another.
    pod_c, _ = rt.run_pod("zyg-c")
    before = _zygotes(rt)
    assert len(before) == 1
    rt.proc.kill()
    rt.proc.start()
    rt.run_pod("zyg-d")
    assert _zygotes(rt) == before
    del pod_c


def test_zygote_stops_with_the_last_pod(rt: Runtime) -> None:
    pod, _ = rt.run_pod("zyg-last")
    assert _zygotes(rt)
    assert _zygotes_after_last_pod(rt, pod, 5) == []
    rt.proc.start()


def test_zygote_stops_with_the_last_pod_after_a_crash_restart(rt: Runtime) -> None:
    """A shimd that was SIGKILLed and restarted never asked the zygote for a shim itself; it must still end
    the zygote its predecessor started once the last pod is gone and it stops."""
    pod, _ = rt.run_pod("zyg-crash")
    assert _zygotes(rt)
    rt.proc.kill()
    rt.proc.start()
    assert _zygotes_after_last_pod(rt, pod, 10) == [], "the zygote outlived the last pod and the daemon"
    rt.proc.start()
