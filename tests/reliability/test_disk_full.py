"""Disk full during a pull and during container creation, on a small tmpfs holding shimd's root."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.daemon import ShimdProcess
from tests.support.runtime import Runtime, runtime_config

ROOT_SIZE = "64m"


class Filler:
    """Takes every free byte of a filesystem, and gives it back."""

    def __init__(self, mount: Path) -> None:
        self.path = mount / "filler"

    def fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096):  # megabytes, then the last partial megabyte
                chunk = b"\0" * size
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        assert os.statvfs(self.path.parent).f_bavail == 0

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@pytest.fixture
def small_root(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
               cni_loopback_dir: Path) -> Iterator[tuple[Runtime, Filler]]:
    host, ref = busybox_registry
    proc = shimd_factory(runtime_config(host, cni_loopback_dir))
    proc.root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOT_SIZE},mode=0711", "shimd-test-root", str(proc.root)],
                   check=True)
    filler = Filler(proc.root)
    rt = Runtime(proc, ref)
    try:
        proc.start()
        yield rt, filler
    finally:
        filler.free()
        if proc.client is not None:
            pb = rt.pb
            with contextlib.suppress(grpc.RpcError):
                for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p.id))
                    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id))
        proc.stop()
        subprocess.run(["umount", str(proc.root)], check=False)
        rt.cleanup()
        subprocess.run(["umount", "-l", str(proc.root)], check=False, stderr=subprocess.DEVNULL)


def _pull(rt: Runtime) -> None:
    rt.client.images.PullImage(rt.pb.PullImageRequest(image=rt.pb.ImageSpec(image=rt.image)), timeout=60)


def test_disk_full_during_pull_and_create(small_root: tuple[Runtime, Filler]) -> None:
    rt, filler = small_root
    pb = rt.pb

    # Pull onto a full disk: a clear RESOURCE_EXHAUSTED, no image recorded.
    filler.fill()
    with pytest.raises(grpc.RpcError) as e:
        _pull(rt)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "space" in e.value.details()
    assert rt.client.images.ListImages(pb.ListImagesRequest()).images == []
    filler.free()
    _pull(rt)
    assert len(rt.client.images.ListImages(pb.ListImagesRequest()).images) == 1

    # Create a container on a full disk: RESOURCE_EXHAUSTED, and no half-made container.
    pod_id, pod_cfg = rt.run_pod("full")
    filler.fill()
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "c", ["sh", "-c", "exit 4"])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    assert not any(n.endswith(".json") for n in os.listdir(rt.proc.root / "containers"))
    # The same name is free again once space is back (the failed create released it).
    filler.free()
    cid = rt.create(pod_id, pod_cfg, "c", ["sh", "-c", "echo ok > /tmp/x; exit 4"])
    rt.start(cid)
    assert rt.wait_state(cid, pb.CONTAINER_EXITED).exit_code == 4

    # Nothing on disk was corrupted: a restarted daemon loads the same image, pod and container.
    rt.proc.kill()
    rt.proc.start()
    assert len(rt.client.images.ListImages(pb.ListImagesRequest()).images) == 1
    assert [p.id for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [pod_id]
    st = rt.status(cid)
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 4)
    # Leftover temp files of the failed writes would be corruption waiting to be read.
    for d in ("pods", "containers"):
        assert [n for n in os.listdir(rt.proc.root / d) if n.startswith(".")] == []
