"""Pods on gVisor (runsc) through the CRI: one sandbox per pod, logs, exec, stop, restart recovery."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import grpc
import pytest

from shimd.config import HandlerConfig
from shimd.runtimes.runsc import RunscRuntime
from tests.integration.test_pod_lifecycle import CRI_LINE, assert_no_leftovers
from tests.support.runtime import Runtime
from tests.support.runtime import exec_sync as _exec
from tests.support.runtime import wait_log as _wait_log

pytestmark = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed")


def _sandboxes_of(pod_id: str) -> list[int]:
    """Host processes of the pod's gVisor sandbox (runsc-sandbox), found by the pause bundle path."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"runsc-sandbox") and pod_id.encode() in cmd:
            found.append(int(pid))
    return found


def test_runsc_pod_lifecycle(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("gv", handler="runsc")
    st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert st.status.state == pb.SANDBOX_READY
    assert st.status.runtime_handler == "runsc"
    assert len(_sandboxes_of(pod_id)) == 1

    cid = rt.create(pod_id, pod_cfg, "app", ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    log = _wait_log(rt.log_dir / "gv" / "app" / "0.log", "hello-err")
    parsed = [CRI_LINE.match(line) for line in log.splitlines()]
    assert all(parsed), log
    assert {("stdout", "hello-out"), ("stderr", "hello-err")} <= {(m.group(3), m.group(5)) for m in parsed if m}

    # Inside is gVisor's kernel, not the host's.
    code, out, _ = _exec(rt, cid, ["dmesg"])
    assert code == 0 and "gVisor" in out, out
    code, out, err = _exec(rt, cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (code, out, err) == (3, "out\n", "err\n")

    # A second container joins the same sandbox (no second runsc-sandbox process).
    quitter = rt.create(pod_id, pod_cfg, "quitter", ["sh", "-c", "uname -r; exit 7"])
    rt.start(quitter)
    st2 = rt.wait_state(quitter, pb.CONTAINER_EXITED)
    assert st2.exit_code == 7
    assert _wait_log(rt.log_dir / "gv" / "quitter" / "0.log", "4.4.0").count("4.4.0") == 1
    assert len(_sandboxes_of(pod_id)) == 1

    # Stats come from the sandbox: the container's own cgroup is empty under gVisor.
    drv = RunscRuntime(HandlerConfig(name="runsc", driver="runsc", binary="runsc", root=str(rt.proc.state / "runsc")),
                      rt.proc.state)
    sample = asyncio.run(drv.container_sample(cid))
    assert sample is not None and sample.cpu_usage_ns and sample.memory_usage and sample.pids
    assert asyncio.run(drv.container_sample("no-such-container")) is None
    stats = rt.client.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    assert stats.cpu.usage_core_nano_seconds.value > 0 and stats.memory.working_set_bytes.value > 0

    with pytest.raises(grpc.RpcError) as e:
        rt.client.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(cpu_shares=512)))
    assert "runsc" in (e.value.details() or "")

    t0 = time.monotonic()
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=10))
    assert rt.status(cid).state == pb.CONTAINER_EXITED
    assert time.monotonic() - t0 < 10  # sleep dies of SIGTERM
    rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=quitter))

    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert _sandboxes_of(pod_id) == []
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_runsc_restart_recovery(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("gvr", handler="runsc")
    runner = rt.create(pod_id, pod_cfg, "runner", ["sleep", "1000"])
    quitter = rt.create(pod_id, pod_cfg, "quitter", ["sh", "-c", "sleep 2; exit 5"])
    rt.start(runner)
    rt.start(quitter)
    rt.wait_state(runner, pb.CONTAINER_RUNNING)

    rt.proc.kill()
    time.sleep(3.5)  # quitter exits while shimd is down
    rt.proc.start()

    assert rt.wait_state(quitter, pb.CONTAINER_EXITED, timeout=15).exit_code == 5
    assert rt.status(runner).state == pb.CONTAINER_RUNNING
    code, out, _ = _exec(rt, runner, ["dmesg"])
    assert code == 0 and "gVisor" in out
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert rt.status(runner).state == pb.CONTAINER_EXITED
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_runsc_streaming_attach_port_forward_and_tty_exec(rt: Runtime) -> None:

    from tests.support.spdy_client import SpdyClient, run_remotecommand, run_tty_resized

    pb, r = rt.pb, rt.client.runtime
    pod_id, pod_cfg = rt.run_pod("gvs", handler="runsc")
    web = rt.create(pod_id, pod_cfg, "web", ["sh", "-c", "mkdir -p /www && echo forwarded-ok > /www/f.txt && "
                                                         "exec httpd -f -p 8080 -h /www"])
    talker = rt.create(pod_id, pod_cfg, "talker", ["sh", "-c", "sleep 1; echo line1; echo errline >&2; sleep 1"])
    rt.start(web)
    rt.start(talker)
    rt.wait_state(web, pb.CONTAINER_RUNNING)

    url = r.Attach(pb.AttachRequest(container_id=talker, stdout=True, stderr=True)).url
    res = asyncio.run(run_remotecommand(url, timeout=30))
    assert (res.stdout, res.stderr) == (b"line1\n", b"errline\n")

    async def forward() -> bytes:
        client = await SpdyClient.connect(r.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id,
                                                                               port=[8080])).url,
                                          ["portforward.k8s.io"])
        try:
            await client.open_stream({"streamType": "error", "port": "8080", "requestID": "0"})
            data = await client.open_stream({"streamType": "data", "port": "8080", "requestID": "0"})
            await data.write(b"GET /f.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(30):
                return await data.read_all(30)  # type: ignore[no-any-return]
        finally:
            await client.close()

    deadline = time.monotonic() + 10
    body = b""
    while b"forwarded-ok" not in body and time.monotonic() < deadline:
        body = asyncio.run(forward())
    assert b"200 OK" in body and b"forwarded-ok" in body

    url = r.Exec(pb.ExecRequest(container_id=web, cmd=["sh", "-c", "sleep 1; stty size"], tty=True,
                                stdout=True)).url
    assert b"37 91" in asyncio.run(run_tty_resized(url, 91, 37))

    # A container with a terminal joining the sandbox gets one (runsc hands it over at start, not create).
    term = rt.create(pod_id, pod_cfg, "term", ["sh", "-c", "[ -t 1 ] && echo stdout-is-tty; sleep 100"], tty=True)
    rt.start(term)
    assert "stdout-is-tty" in _wait_log(rt.log_dir / "gvs" / "term" / "0.log", "stdout-is-tty")
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_runsc_shared_pid_namespace(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("gvpid", handler="runsc", linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.POD))))
    shared = pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD)))
    a = rt.create(pod_id, pod_cfg, "a", ["sleep", "1234"], linux=shared)
    b = rt.create(pod_id, pod_cfg, "b", ["sleep", "1000"], linux=shared)
    rt.start(a)
    rt.start(b)
    rt.wait_state(b, pb.CONTAINER_RUNNING)
    code, out, _ = _exec(rt, b, ["ps"])
    assert code == 0 and "sleep 1234" in out, out
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_runsc_dead_shim_is_detected_and_cleaned(rt: Runtime) -> None:
    import signal

    from tests.support.procs import shim_pids

    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("gvdead", handler="runsc")
    cid = rt.create(pod_id, pod_cfg, "sleeper", ["sleep", "1000"])
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    shims = shim_pids(pod_id)
    assert shims
    for p in shims:
        os.kill(p, signal.SIGKILL)
    assert rt.wait_state(cid, pb.CONTAINER_EXITED, timeout=15).reason == "ShimDied"
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert _sandboxes_of(pod_id) == []
    assert_no_leftovers(rt, pod_id)
