"""Fixtures for pod/container tests: a registry with busybox, a CNI conf dir, and a shimd using both."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.daemon import ShimdProcess
from tests.support.registry import free_port

LOOPBACK_CONFLIST = {"cniVersion": "0.4.0", "name": "shimd-test-lo", "plugins": [{"type": "loopback"}]}


@pytest.fixture(scope="session")
def busybox_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(registry host, busybox image ref) shared by the pod/container tests."""
    from tests.support import registry as reg

    base = tmp_path_factory.mktemp("reg-rt")
    r = reg.start_registry(base)
    try:
        ref = reg.push_busybox(r, "shimd-test/busybox", "1")
        yield r.host, ref
    finally:
        r.stop()


@pytest.fixture(scope="session")
def cni_loopback_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cni")
    (d / "10-lo.conflist").write_text(json.dumps(LOOPBACK_CONFLIST))
    return d


def runtime_config(registry_host: str, cni_dir: Path) -> str:
    return (f'[registries.hosts."{registry_host}"]\ninsecure = true\n'
            f'[cni]\nconf_dir = "{cni_dir}"\n')


@contextlib.contextmanager
def started_runtime(factory: Callable[..., ShimdProcess], registry: tuple[str, str], cni_dir: Path,
                    extra_config: str = "") -> Iterator[Runtime]:
    """A started shimd with the registry's busybox pulled, cleaned up on leaving (even after a failure)."""
    host, ref = registry
    proc = factory(runtime_config(host, cni_dir) + extra_config)
    runtime = Runtime(proc, ref)
    try:
        proc.start()
        runtime.client.images.PullImage(runtime.pb.PullImageRequest(image=runtime.pb.ImageSpec(image=ref)))
        yield runtime
    finally:
        runtime.cleanup()


@pytest.fixture
def rt(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
       cni_loopback_dir: Path) -> Iterator[Runtime]:
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir) as runtime:
        yield runtime


@pytest.fixture
def metrics_rt(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
               cni_loopback_dir: Path) -> Iterator[tuple[Runtime, str]]:
    """Like rt, with the Prometheus endpoint on a free loopback port: (runtime, its /metrics URL)."""
    port = free_port()
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir,
                         f'[metrics]\naddress = "127.0.0.1:{port}"\n') as runtime:
        yield runtime, f"http://127.0.0.1:{port}/metrics"


class Runtime:
    """A started shimd with helpers that speak CRI the way kubelet does."""

    def __init__(self, proc: ShimdProcess, image: str) -> None:
        self.proc = proc
        self.image = image
        self.log_dir = proc.base / "logs"
        self.log_dir.mkdir(exist_ok=True)

    @property
    def client(self) -> Any:
        assert self.proc.client is not None
        return self.proc.client

    @property
    def pb(self) -> Any:
        return self.client.pb

    def pod_config(self, name: str = "pod", uid: str | None = None, **kw: Any) -> Any:
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=uid or f"uid-{name}", attempt=0),
            log_directory=str(self.log_dir / name), **kw)

    def run_pod(self, name: str = "pod", handler: str = "", **kw: Any) -> tuple[str, Any]:
        cfg = self.pod_config(name, **kw)
        resp = self.client.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler))
        return resp.pod_sandbox_id, cfg

    def container_config(self, name: str, command: list[str], **kw: Any) -> Any:
        pb = self.pb
        return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=0),
                                  image=pb.ImageSpec(image=self.image), command=command,
                                  log_path=f"{name}/0.log", **kw)

    def create(self, pod_id: str, pod_cfg: Any, name: str, command: list[str], **kw: Any) -> str:
        resp = self.client.runtime.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=self.container_config(name, command, **kw), sandbox_config=pod_cfg))
        return resp.container_id

    def start(self, cid: str) -> None:
        self.client.runtime.StartContainer(self.pb.StartContainerRequest(container_id=cid))

    def status(self, cid: str) -> Any:
        return self.client.runtime.ContainerStatus(self.pb.ContainerStatusRequest(container_id=cid)).status

    def wait_state(self, cid: str, state: int, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(cid)
            if st.state == state:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"container {cid} stayed in state {st.state}, wanted {state}")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Remove every pod so no shim, mount or netns outlives the test, even after a failure."""
        if self.proc.client is None or (self.proc.proc and self.proc.proc.poll() is not None):
            with_client = False
        else:
            with_client = True
        if with_client:
            try:
                pods = self.client.runtime.ListPodSandbox(self.pb.ListPodSandboxRequest()).items
                for p in pods:
                    self.client.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=p.id))
                    self.client.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=p.id))
            except grpc.RpcError:
                pass
        self.proc.stop()
        kill_strays(self.proc.base)
        leaked = [line.split(" ")[4] for line in open("/proc/self/mountinfo") if str(self.proc.base) in line]
        assert not leaked, f"mounts left after shimd stopped: {leaked}"


def kill_strays(base: Path) -> None:
    """Last resort: shims and containers whose command line or mounts point into this test's dir."""
    me = str(base)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if me.encode() in env or me.encode() in cmd:
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
    subprocess.run(["sh", "-c", f"grep -F ' {me}' /proc/self/mountinfo | cut -d' ' -f5 | sort -r | "
                    "xargs -r -n1 umount -l"], check=False)


def exec_sync(rt: Runtime, cid: str, cmd: list[str], timeout: int = 20) -> tuple[int, str, str]:
    """ExecSync through the CRI: (exit code, stdout, stderr)."""
    r = rt.client.runtime.ExecSync(rt.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


def wait_log(path: Path, text: str, timeout: float = 20.0) -> str:
    """The log file's content once it contains text (or whatever it holds when the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.1)
