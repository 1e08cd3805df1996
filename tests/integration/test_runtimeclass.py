"""RuntimeClass end to end: several handlers side by side, each pod running where it should."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.integration.test_pod_lifecycle import assert_no_leftovers
from tests.support.runtime import Runtime
from tests.support.sandboxed import RUNC_V2_SHIM

pytestmark = [
    pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed"),
    pytest.mark.skipif(RUNC_V2_SHIM is None, reason="containerd-shim-runc-v2 is not installed"),
]


def _exec(rt: Runtime, cid: str, cmd: list[str]) -> tuple[int, str]:
    r = rt.client.runtime.ExecSync(rt.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=20))
    return r.exit_code, r.stdout.decode()


def test_status_lists_every_handler_and_bad_handlers_fail_cleanly(rt_sandboxed: Runtime) -> None:
    rt, pb = rt_sandboxed, rt_sandboxed.pb
    st = rt.client.runtime.Status(pb.StatusRequest(verbose=True))
    names = [h.name for h in st.runtime_handlers]
    assert names[0] == "" and {"runc", "runsc", "runcv2", "missing"} <= set(names[1:])
    handlers = json.loads(st.info["config"])["handlers"]
    assert handlers["runc"]["available"] and handlers["runsc"]["available"] and handlers["runcv2"]["available"]
    assert not handlers["missing"]["available"] and "not found" in handlers["missing"]["reason"]
    ready = {c.type: c.status for c in st.status.conditions}
    assert ready["RuntimeReady"]  # a broken extra handler does not make the runtime unready

    with pytest.raises(grpc.RpcError) as e:
        rt.run_pod("nosuch", handler="nosuch")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nosuch" in e.value.details() and "runsc" in e.value.details() and "runcv2" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        rt.run_pod("missing", handler="missing")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "containerd-shim-nosuch-v2" in e.value.details()
    assert rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []

    # The other handlers are unaffected.
    pod_id, _ = rt.run_pod("fine", handler="runcv2")
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_runc_runsc_and_shimv2_pods_side_by_side(rt_sandboxed: Runtime) -> None:
    rt, pb = rt_sandboxed, rt_sandboxed.pb
    handlers = ["runc", "runsc", "runcv2"]

    def start(handler: str) -> tuple[str, str]:
        pod_id, cfg = rt.run_pod(f"side-{handler}", handler=handler)
        cid = rt.create(pod_id, cfg, "main", ["sleep", "1000"])
        rt.start(cid)
        return pod_id, cid

    with ThreadPoolExecutor(len(handlers)) as pool:
        started = dict(zip(handlers, pool.map(start, handlers), strict=True))
    try:
        for handler, (pod_id, cid) in started.items():
            rt.wait_state(cid, pb.CONTAINER_RUNNING)
            pod = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
            assert pod.runtime_handler == handler and pod.state == pb.SANDBOX_READY
        host_release = os.uname().release
        code, out = _exec(rt, started["runsc"][1], ["dmesg"])
        assert code == 0 and "gVisor" in out, out
        code, out = _exec(rt, started["runsc"][1], ["uname", "-r"])
        assert out.strip() != host_release
        for handler in ("runc", "runcv2"):
            code, out = _exec(rt, started[handler][1], ["uname", "-r"])
            assert (code, out.strip()) == (0, host_release), handler
            code, out = _exec(rt, started[handler][1], ["sh", "-c", "dmesg 2>&1 | head -3"])
            assert "gVisor" not in out, handler
    finally:
        for pod_id, _ in started.values():
            rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    for pod_id, _ in started.values():
        assert_no_leftovers(rt, pod_id)
