"""Issue 15: mount propagation, image volumes (CRI Mount.image) and cAdvisor's container metric set,
through the grpcio client against real runc, a real registry and real CNI."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.network import NetRuntime
from tests.support.runtime import Runtime, exec_sync, started_runtime

PRIVATE, HOST_TO_CONTAINER, BIDIRECTIONAL = 0, 1, 2


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(str(path))]


def _umount_under(path: Path) -> None:
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, timeout=20)


@contextmanager
def _shared_dir(base: Path, shared: bool = True) -> Iterator[tuple[Path, Path]]:
    """(mnt, src) as critest builds them: mnt a bind mount of itself, made rshared (or left private)."""
    mnt, src = base / "mnt", base / "src"
    (mnt / "propagationMnt").mkdir(parents=True)
    src.mkdir()
    (src / "flagFile").write_text("flag\n")
    try:
        subprocess.run(["mount", "--bind", str(mnt), str(mnt)], check=True, timeout=20)
        subprocess.run(["mount", "--make-rshared" if shared else "--make-rprivate", str(mnt)], check=True,
                       timeout=20)
        yield mnt, src
    finally:
        _umount_under(base)


def _privileged_pod(rt: Runtime, name: str) -> tuple[str, Any]:
    pb = rt.pb
    return rt.run_pod(name, linux=pb.LinuxPodSandboxConfig(
        security_context=pb.LinuxSandboxSecurityContext(privileged=True)))


def _volume_ctr(rt: Runtime, pod_id: str, pod_cfg: Any, name: str, mnt: Path, propagation: int) -> str:
    pb = rt.pb
    cid = rt.create(pod_id, pod_cfg, name, ["sleep", "3600"],
                    linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(privileged=True)),
                    mounts=[pb.Mount(host_path=str(mnt), container_path=str(mnt), propagation=propagation)])
    st = rt.status(cid)
    assert [(m.host_path, m.container_path, m.propagation, m.readonly) for m in st.mounts] == [
        (str(mnt), str(mnt), propagation, False)]
    rt.start(cid)
    return cid


@pytest.mark.parametrize("propagation", [BIDIRECTIONAL, HOST_TO_CONTAINER, PRIVATE],
                         ids=["rshared", "rslave", "rprivate"])
def test_mount_propagation(rt: Runtime, propagation: int) -> None:
    """critest's "Container Mount Propagation": mounts cross between host and container exactly as asked."""
    pod_id, pod_cfg = _privileged_pod(rt, "prop")
    with _shared_dir(rt.proc.base / "prop", shared=propagation != PRIVATE) as (mnt, src):
        cid = _volume_ctr(rt, pod_id, pod_cfg, "vol", mnt, propagation)
        # Host -> container: a mount made on the host after the container started.
        subprocess.run(["mount", "--bind", str(src), str(mnt / "propagationMnt")], check=True, timeout=20)
        code, out, err = exec_sync(rt, cid, ["ls", "-A", str(mnt / "propagationMnt")])
        assert (code, out.split()) == (0, [] if propagation == PRIVATE else ["flagFile"]), err
        # Container -> host: only for Bidirectional.
        code, _, err = exec_sync(rt, cid, ["sh", "-c", f"mkdir -p {mnt}/ctrMnt && mount --bind /etc {mnt}/ctrMnt"])
        assert code == 0, err
        seen = sorted(os.listdir(mnt / "ctrMnt"))
        if propagation == BIDIRECTIONAL:
            assert "passwd" in seen
        else:
            assert seen == []
        rt.client.runtime.RemoveContainer(rt.pb.RemoveContainerRequest(container_id=cid))


def test_mount_propagation_needs_a_shared_host_mount(rt: Runtime) -> None:
    """A Bidirectional or HostToContainer volume on a private host mount cannot propagate: refused by
    name rather than silently private (as containerd does)."""
    pb = rt.pb
    pod_id, pod_cfg = _privileged_pod(rt, "noprop")
    with _shared_dir(rt.proc.base / "noprop", shared=False) as (mnt, _):
        for mode in (BIDIRECTIONAL, HOST_TO_CONTAINER):
            with pytest.raises(grpc.RpcError) as e:
                rt.create(pod_id, pod_cfg, f"c{mode}", ["sleep", "60"],
                          mounts=[pb.Mount(host_path=str(mnt), container_path="/v", propagation=mode)])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "mounts[0].propagation" in e.value.details() and "shared" in e.value.details()
        # Private needs nothing from the host mount.
        cid = rt.create(pod_id, pod_cfg, "private", ["sleep", "60"],
                        mounts=[pb.Mount(host_path=str(mnt), container_path="/v")])
        rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


# --- image volumes -------------------------------------------------------------------------------

def _volume_image() -> img.Manifest:
    """busybox + a layer with data, a whiteout, and symlinks that point out of the image if followed on the host."""
    extra = img.make_layer([
        img.Entry("dir", "data", mode=0o755),
        img.Entry("file", "data/keep", b"keep\n"),
        img.Entry("file", "data/gone", b"gone\n"),
        img.Entry("symlink", "abs", target="/data"),
        img.Entry("symlink", "up", target="../../../../../../data"),
        img.Entry("symlink", "hostroot", target="/"),
    ])
    hide = img.make_layer([img.Entry("dir", "data", mode=0o755), img.Entry("file", "data/.wh.gone")], "none")
    return img.make_image([img.busybox_layer(), extra, hide], extra_config={"Labels": {"shimd.test": "volume"}})


@pytest.fixture(scope="module")
def volume_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(registry host, busybox ref, volume image ref) on a registry of this module's own."""
    from tests.support import registry as reg

    r = reg.start_registry(tmp_path_factory.mktemp("reg-vol"))
    try:
        c = r.client()
        yield r.host, c.push_image("vol/busybox", "1", img.busybox_image()), c.push_image("vol/data", "1",
                                                                                           _volume_image())
    finally:
        r.stop()


@pytest.fixture
def vol_rt(shimd_factory: Callable[..., ShimdProcess], volume_registry: tuple[str, str, str],
           cni_loopback_dir: Path) -> Iterator[Runtime]:
    host, busybox, _ = volume_registry
    with started_runtime(shimd_factory, (host, busybox), cni_loopback_dir) as runtime:
        yield runtime


def _image_mount(pb: Any, image_ref: str, user: str, path: str = "/mnt/vol", sub: str = "",
                 readonly: bool = True) -> Any:
    return pb.Mount(container_path=path, readonly=readonly, image_sub_path=sub,
                    image=pb.ImageSpec(image=image_ref, user_specified_image=user))


def _create_err(rt: Runtime, pod_id: str, pod_cfg: Any, mounts: list[Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "bad", ["sleep", "60"], mounts=mounts)
    return e.value


def test_image_volume(vol_rt: Runtime, volume_registry: tuple[str, str, str]) -> None:
    rt, pb = vol_rt, vol_rt.pb
    _, _, vol_ref = volume_registry
    pod_id, pod_cfg = rt.run_pod("imgvol")

    # Not pulled yet: a clear NOT_FOUND naming the field (kubelet pulls first, then retries).
    err = _create_err(rt, pod_id, pod_cfg, [_image_mount(pb, vol_ref, vol_ref)])
    assert err.code() == grpc.StatusCode.NOT_FOUND and "mounts[0].image.image" in err.details()

    image_ref = rt.client.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=vol_ref))).image_ref
    for bad, code, field in [
        (_image_mount(pb, image_ref, vol_ref, readonly=False), grpc.StatusCode.INVALID_ARGUMENT, "readonly"),
        (_image_mount(pb, image_ref, vol_ref, sub="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "image_sub_path"),
        (_image_mount(pb, image_ref, vol_ref, sub="/data"), grpc.StatusCode.INVALID_ARGUMENT, "image_sub_path"),
        (_image_mount(pb, image_ref, vol_ref, sub="nope"), grpc.StatusCode.NOT_FOUND, "image_sub_path"),
        (_image_mount(pb, image_ref, vol_ref, sub="data/gone"), grpc.StatusCode.NOT_FOUND, "image_sub_path"),
    ]:
        err = _create_err(rt, pod_id, pod_cfg, [bad])
        assert err.code() == code and f"mounts[0].{field}" in err.details(), err.details()

    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "3600"], mounts=[
        _image_mount(pb, image_ref, vol_ref),
        _image_mount(pb, image_ref, vol_ref, "/mnt/sub", sub="data"),
        _image_mount(pb, image_ref, vol_ref, "/mnt/abs", sub="abs"),
        _image_mount(pb, image_ref, vol_ref, "/mnt/up", sub="up"),
        _image_mount(pb, image_ref, vol_ref, "/mnt/root", sub="hostroot"),
    ])
    mounts = {m.container_path: m for m in rt.status(cid).mounts}
    assert set(mounts) == {"/mnt/vol", "/mnt/sub", "/mnt/abs", "/mnt/up", "/mnt/root"}
    m = mounts["/mnt/sub"]
    assert (m.image.image, m.image.image_ref, m.image.user_specified_image, m.image_sub_path, m.readonly,
            m.host_path) == (image_ref, image_ref, vol_ref, "data", True, "")
    rt.start(cid)

    def sh(script: str) -> tuple[int, str]:
        code, out, err = exec_sync(rt, cid, ["sh", "-c", script])
        return code, out + err

    assert sh("cat /mnt/vol/data/keep /mnt/sub/keep /mnt/abs/keep /mnt/up/keep") == (0, "keep\n" * 4)
    assert sh("test -e /mnt/vol/data/gone || test -e /mnt/sub/gone")[0] != 0  # the whiteout holds
    # Symlinks resolve inside the image: "/" there is the image's root, not the host's.
    assert sh("test -e /mnt/root/data/keep && test ! -e /mnt/root/usr/lib")[0] == 0
    # Executable, but not writable, not even by root in the container.
    assert sh("/mnt/vol/bin/ls /mnt/vol/data")[0] == 0
    code, out = sh("touch /mnt/vol/new || touch /mnt/sub/new || echo x > /mnt/vol/data/keep")
    assert code != 0 and "Read-only file system" in out
    assert sh("cat /mnt/vol/data/keep")[1] == "keep\n"

    # The volume's image is in use: it cannot be removed under the container.
    with pytest.raises(grpc.RpcError) as e:
        rt.client.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_ref)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    bundle = rt.proc.state / "containers" / cid
    assert len(_mounts_under(bundle / "volumes")) == 5
    rt.client.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    assert _mounts_under(bundle) == []
    rt.client.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image_ref)))


def test_image_volume_privileged_cannot_write(vol_rt: Runtime, volume_registry: tuple[str, str, str]) -> None:
    """Not even CAP_SYS_ADMIN can remount it writable: the image store's layers stay as pulled."""
    rt, pb = vol_rt, vol_rt.pb
    image_ref = rt.client.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=volume_registry[2]))).image_ref
    pod_id, pod_cfg = _privileged_pod(rt, "imgvolpriv")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "3600"], mounts=[_image_mount(pb, image_ref, "")],
                    linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(privileged=True)))
    rt.start(cid)
    code, out, err = exec_sync(rt, cid, ["sh", "-c", "mount -o remount,rw /mnt/vol; echo x > /mnt/vol/data/keep"])
    assert code != 0, out + err
    assert exec_sync(rt, cid, ["cat", "/mnt/vol/data/keep"])[1] == "keep\n"
    # Removing the pod (not the container first) cleans the volumes up too.
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert _mounts_under(rt.proc.state / "containers") == []


# --- cAdvisor's container metric set ---------------------------------------------------------------

CONTAINER_METRICS = [
    "container_blkio_device_usage_total", "container_cpu_cfs_periods_total",
    "container_cpu_cfs_throttled_periods_total", "container_cpu_cfs_throttled_seconds_total",
    "container_cpu_system_seconds_total", "container_cpu_user_seconds_total", "container_cpu_usage_seconds_total",
    "container_file_descriptors", "container_fs_inodes_free", "container_fs_limit_bytes",
    "container_fs_reads_bytes_total", "container_fs_reads_total", "container_fs_writes_bytes_total",
    "container_fs_writes_total", "container_memory_failcnt", "container_memory_kernel_usage",
    "container_memory_cache", "container_memory_mapped_file", "container_memory_max_usage_bytes", "container_sockets",
    "container_spec_cpu_period", "container_spec_cpu_shares", "container_spec_memory_swap_limit_bytes",
    "container_threads", "container_threads_max",
]
POD_METRICS = [
    "container_network_receive_packets_total", "container_network_receive_packets_dropped_total",
    "container_network_transmit_packets_total", "container_network_transmit_packets_dropped_total",
]


def _metrics(rt: Runtime) -> tuple[dict[str, list[str]], Any, dict[str, list[Any]]]:
    """(descriptor labels by name, the one pod's metrics, its and its container's series by name)."""
    pb = rt.pb
    descs = {d.name: list(d.label_keys) for d in rt.client.runtime.ListMetricDescriptors(
        pb.ListMetricDescriptorsRequest()).descriptors}
    [pm] = rt.client.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    by_name: dict[str, list[Any]] = {}
    for cm in pm.container_metrics:
        for m in cm.metrics:
            by_name.setdefault(m.name, []).append(m)
    for m in pm.metrics:
        by_name.setdefault(m.name, []).append(m)
    for name, ms in by_name.items():
        assert all(len(m.label_values) == len(descs[name]) for m in ms), name
    return descs, pm, by_name


def test_cadvisor_metric_set(net_rt: NetRuntime) -> None:
    rt, pb = net_rt.rt, net_rt.rt.pb
    pod_id, pod_cfg = rt.run_pod("metrics")
    # As kubelet sends them (swap limit = memory limit: no swap).
    res = pb.LinuxContainerResources(cpu_period=100000, cpu_quota=50000, cpu_shares=512,
                                     memory_limit_in_bytes=64 * 2**20, memory_swap_limit_in_bytes=64 * 2**20)
    # A listening socket and a pipe stay open.
    cid = rt.create(pod_id, pod_cfg, "app", ["sh", "-c", "nc -l -p 7070 & sleep 3600 | cat"],
                    linux=pb.LinuxContainerConfig(resources=res))
    rt.start(cid)
    # Traffic in the pod's netns, so packet counters move (the bridge's gateway answers).
    code, out, err = exec_sync(rt, cid, ["sh", "-c", f"ping -c 2 -W 2 {net_rt.net.ip(1)} >/dev/null; "
                                         "until netstat -ln | grep -q 7070; do sleep 0.1; done"])
    assert code == 0, out + err

    descs, pm, by_name = _metrics(rt)
    missing = [n for n in CONTAINER_METRICS + POD_METRICS if n not in descs]
    assert not missing, f"not described: {missing}"
    assert descs["container_blkio_device_usage_total"][-4:] == ["device", "major", "minor", "operation"]
    assert descs["container_cpu_usage_seconds_total"][-1] == "cpu"
    assert descs["container_network_receive_packets_total"][-1] == "interface"
    assert [cm.container_id for cm in pm.container_metrics] == [cid]
    missing = [n for n in CONTAINER_METRICS if not any(m.label_values[0] == "app" for m in by_name.get(n, []))]
    missing += [n for n in POD_METRICS if not any(m.label_values[0] == "POD" for m in by_name.get(n, []))]
    assert not missing, f"no value: {missing}"

    def value(name: str, **labels: str) -> int:
        found = [m.value.value for m in by_name[name]
                 if all(m.label_values[descs[name].index(k)] == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    # Values from the container's own cgroups, processes and netns, not placeholders.
    assert value("container_spec_cpu_period") == 100000
    assert value("container_spec_cpu_shares") == 512
    assert value("container_spec_cpu_quota") == 50000
    assert value("container_spec_memory_swap_limit_bytes") == 64 * 2**20
    assert value("container_cpu_usage_seconds_total", cpu="total") >= 0
    assert value("container_memory_max_usage_bytes") >= value("container_memory_usage_bytes") > 0
    assert value("container_threads") >= 3 and value("container_threads_max") >= 0
    assert value("container_sockets") >= 1  # nc's listening socket
    assert value("container_file_descriptors") >= 6
    assert value("container_ulimits_soft", ulimit="max_open_files") > 0
    assert value("container_fs_limit_bytes") > value("container_fs_inodes_free") > 0
    assert value("container_network_transmit_packets_total", interface="eth0") >= 2
    assert value("container_network_receive_packets_total", interface="eth0") >= 2

    # Linux 5.x+ counts v1 blkio only for cgroups with a throttle rule: give the container's own cgroup
    # one that never limits, then do direct I/O on its writable layer's device.
    dev = os.stat(rt.proc.root / "rw" / cid / "upper").st_dev
    blkio = Path("/sys/fs/cgroup/blkio/shimd") / f"pod{pod_id[:16]}" / cid
    if blkio.is_dir():
        for f in ("blkio.throttle.write_bps_device", "blkio.throttle.read_bps_device"):
            (blkio / f).write_text(f"{os.major(dev)}:{os.minor(dev)} {1 << 40}\n")
        code, out, err = exec_sync(rt, cid, ["sh", "-c", "dd if=/dev/zero of=/io bs=4096 count=64 oflag=direct && "
                                             "dd if=/io of=/dev/null bs=4096 iflag=direct"])
        assert code == 0, out + err
        _, _, by_name = _metrics(rt)
        dev_name = f"{os.major(dev)}", f"{os.minor(dev)}"
        writes = [m.value.value for m in by_name["container_blkio_device_usage_total"]
                  if tuple(m.label_values[-3:-1]) == dev_name and m.label_values[-1] == "Write"]
        assert writes and writes[0] >= 64 * 4096
        assert sum(m.value.value for m in by_name["container_fs_writes_bytes_total"]) >= 64 * 4096
        assert sum(m.value.value for m in by_name["container_fs_reads_bytes_total"]) >= 64 * 4096
        assert sum(m.value.value for m in by_name["container_fs_reads_total"]) >= 1
