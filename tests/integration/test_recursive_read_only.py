"""critest's "Container Mount Readonly": CRI Mount.recursive_read_only through the grpcio client, against
real runc, and refused on a handler whose runtime cannot do it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.support.daemon import ShimdProcess
from tests.support.runtime import Runtime, exec_sync, started_runtime

# A runc that hides its `features` (as runc before 1.1 has none): shimd cannot prove rro there.
NO_FEATURES_RUNC = '#!/bin/sh\n[ "$1" = features ] && exit 1\nexec runc "$@"\n'


@pytest.fixture
def rt_rro(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
           cni_loopback_dir: Path, tmp_base: Path) -> Iterator[Runtime]:
    old = tmp_base / "old-runc"
    old.write_text(NO_FEATURES_RUNC)
    old.chmod(0o755)
    with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir,
                         f'[handlers.oldrunc]\ndriver = "runc"\nbinary = "{old}"\n') as runtime:
        yield runtime


@contextmanager
def _host_path_with_tmpfs(base: Path) -> Iterator[Path]:
    """As critest builds it: a directory with a tmpfs mounted on its `tmpfs` subdirectory."""
    host = base / "rro-vol"
    (host / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(host / "tmpfs")], check=True, timeout=20)
    try:
        yield host
    finally:
        subprocess.run(["umount", "-l", str(host / "tmpfs")], check=False, timeout=20)


def _features(rt: Runtime) -> dict[str, tuple[bool, bool]]:
    st = rt.client.runtime.Status(rt.pb.StatusRequest())
    return {h.name: (h.features.recursive_read_only_mounts, h.features.user_namespaces) for h in st.runtime_handlers}


def test_status_claims_rro_only_where_runc_lists_it(rt_rro: Runtime) -> None:
    features = _features(rt_rro)
    # The empty name is the default handler (runc), which kubelet and critest read.
    assert features[""][0] and features["runc"][0]
    assert not features["oldrunc"][0] and not features["runsc"][0]


@pytest.mark.parametrize("rro", [True, False], ids=["rro", "ro"])
def test_submount_is_read_only_only_with_rro(rt_rro: Runtime, rro: bool) -> None:
    rt, pb = rt_rro, rt_rro.pb
    pod_id, pod_cfg = rt.run_pod("rro")
    with _host_path_with_tmpfs(rt.proc.base) as host:
        cid = rt.create(pod_id, pod_cfg, "vol", ["sleep", "3600"],
                        mounts=[pb.Mount(host_path=str(host), container_path="/mnt", readonly=True,
                                         recursive_read_only=rro)])
        st = rt.status(cid)
        assert [(m.container_path, m.readonly, m.recursive_read_only) for m in st.mounts] == [("/mnt", True, rro)]
        rt.start(cid)
        code, _, err = exec_sync(rt, cid, ["touch", "/mnt/tmpfs/file"])
        if rro:
            assert code != 0 and "Read-only file system" in err
        else:
            assert code == 0, err
            assert (host / "tmpfs" / "file").exists()
        # The mount itself is read-only either way.
        code, _, err = exec_sync(rt, cid, ["touch", "/mnt/top"])
        assert code != 0 and "Read-only file system" in err
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_rro_refused_with_the_field_named(rt_rro: Runtime) -> None:
    rt, pb = rt_rro, rt_rro.pb
    pod_id, pod_cfg = rt.run_pod("bad")
    host = rt.proc.base / "rro-bad"
    host.mkdir()
    cases = [
        (pb.Mount(host_path=str(host), container_path="/mnt", readonly=False, recursive_read_only=True),
         "config.mounts[0].readonly"),
        (pb.Mount(host_path=str(host), container_path="/mnt", readonly=True, recursive_read_only=True,
                  propagation=1), "config.mounts[0].propagation"),
        (pb.Mount(host_path=str(host), container_path="/mnt", readonly=True, recursive_read_only=True,
                  propagation=2), "config.mounts[0].propagation"),
    ]
    for i, (mount, field) in enumerate(cases):
        with pytest.raises(grpc.RpcError) as e:
            rt.create(pod_id, pod_cfg, f"c{i}", ["sleep", "60"], mounts=[mount])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.mounts[0].recursive_read_only" in e.value.details() and field in e.value.details()

    # A handler whose runtime cannot apply rro refuses it instead of leaving submounts writable.
    old_id, old_cfg = rt.run_pod("old", handler="oldrunc")
    mount = pb.Mount(host_path=str(host), container_path="/mnt", readonly=True, recursive_read_only=True)
    with pytest.raises(grpc.RpcError) as e:
        rt.create(old_id, old_cfg, "c", ["sleep", "60"], mounts=[mount])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.mounts[0].recursive_read_only" in e.value.details() and "oldrunc" in e.value.details()
    # Nothing was left behind by the refusals; a plain read-only mount still works on that handler.
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    cid = rt.create(old_id, old_cfg, "c", ["sleep", "60"],
                    mounts=[pb.Mount(host_path=str(host), container_path="/mnt", readonly=True)])
    rt.start(cid)
