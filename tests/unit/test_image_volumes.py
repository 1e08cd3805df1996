"""Sub path resolution of image volumes and the rootfs propagation a container's volumes need."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shimd.api.runtime import v1 as cri
from shimd.containers.image_volumes import resolve_in_root
from shimd.oci.spec import rootfs_propagation


def test_resolve_in_root_keeps_symlinks_inside(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("x")
    os.symlink("/data", tmp_path / "abs")
    os.symlink("../../../../data", tmp_path / "up")
    os.symlink("/", tmp_path / "root")
    os.symlink("loop", tmp_path / "loop")
    assert resolve_in_root(str(tmp_path), "data") == "data"
    assert resolve_in_root(str(tmp_path), "abs/f") == "data/f"
    assert resolve_in_root(str(tmp_path), "up") == "data"
    assert resolve_in_root(str(tmp_path), "root") == ""
    assert resolve_in_root(str(tmp_path), "./data/../data/f") == "data/f"
    with pytest.raises(FileNotFoundError):
        resolve_in_root(str(tmp_path), "root/etc")
    with pytest.raises(OSError):
        resolve_in_root(str(tmp_path), "loop")
    with pytest.raises(OSError):
        resolve_in_root(str(tmp_path), "data/f/g")


def test_rootfs_propagation_follows_the_strongest_volume() -> None:
    def cfg(*modes: cri.MountPropagation) -> cri.ContainerConfig:
        return cri.ContainerConfig(mounts=[cri.Mount(container_path=f"/m{i}", host_path="/x", propagation=m)
                                           for i, m in enumerate(modes)])
    assert rootfs_propagation(cfg()) is None
    assert rootfs_propagation(cfg(cri.MountPropagation.PROPAGATION_PRIVATE)) is None
    assert rootfs_propagation(cfg(cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER)) == "rslave"
    assert rootfs_propagation(cfg(cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
                                  cri.MountPropagation.PROPAGATION_BIDIRECTIONAL)) == "rshared"
