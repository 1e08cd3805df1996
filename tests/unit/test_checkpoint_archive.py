"""The checkpoint archive on real files: what CheckpointContainer writes is what restore reads back.

CRIU itself is out of the picture here (tests/integration/test_checkpoint.py drives it); this holds the
layout kubelet and CRI-O use and the writable layer's round trip, whiteouts included.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shimd import errors
from shimd.containers import checkpoint as ckpt


def _container(tmp: Path) -> dict[str, Path]:
    bundle, images, work, upper = (tmp / n for n in ("bundle", "images", "work", "upper"))
    for d in (bundle, images, work, upper / "etc", upper / "var" / "data"):
        d.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps({"process": {"args": ["sleep", "1"]}}))
    (images / "inventory.img").write_bytes(b"\x01\x02")
    (images / "stats-dump").write_bytes(b"stats")
    (work / "dump.log").write_text("(00.1) dumping\n")
    (upper / "var" / "data" / ".hidden").write_text("kept\n")
    (upper / "tool").write_text("#!/bin/sh\n")
    os.chmod(upper / "tool", 0o4755)
    os.symlink("/bin/busybox", upper / "sh-link")
    if os.geteuid() == 0:
        os.mknod(upper / "etc" / "group", stat.S_IFCHR, os.makedev(0, 0))  # the container deleted /etc/group
    return {"bundle": bundle, "images": images, "work": work, "upper": upper}


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".tar.xz"])
def test_archive_layout_and_round_trip(tmp_path: Path, suffix: str) -> None:
    paths = _container(tmp_path)
    location = str(tmp_path / f"ckpt{suffix}")
    ckpt.write_archive(location, config_dump={"id": "c1", "name": "app", "rootfsImageName": "busybox:1"},
                       **paths)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o600  # it holds the process's memory
    with tarfile.open(location, "r:*") as tar:
        names = set(tar.getnames())
    assert {"config.dump", "spec.dump", "checkpoint", "checkpoint/inventory.img", "rootfs-diff.tar", "dump.log",
            "stats-dump"} <= names, names
    if suffix != ".tar":
        with open(location, "rb") as f:
            assert f.read(6)[:2] in (b"\x1f\x8b", b"\xfd7"), "not compressed as the suffix asks"

    dest = tmp_path / "unpacked"
    unpacked = ckpt.unpack(Path(location), dest)
    assert unpacked.config["name"] == "app" and unpacked.image_refs() == ["busybox:1"]
    assert unpacked.spec["process"]["args"] == ["sleep", "1"]
    assert (unpacked.images / "inventory.img").read_bytes() == b"\x01\x02"

    new_upper = tmp_path / "new-upper"
    new_upper.mkdir()
    ckpt.apply_rootfs_diff(unpacked, new_upper)
    assert (new_upper / "var" / "data" / ".hidden").read_text() == "kept\n"
    assert stat.S_IMODE(os.stat(new_upper / "tool").st_mode) == 0o4755  # the layer's own modes are kept
    assert os.readlink(new_upper / "sh-link") == "/bin/busybox"
    if os.geteuid() == 0:
        assert json.loads((dest / "deleted.files").read_text()) == ["/etc/group"]
        st = os.lstat(new_upper / "etc" / "group")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_location_must_be_a_file_in_an_existing_directory(tmp_path: Path) -> None:
    paths = _container(tmp_path)
    for location in (str(tmp_path / "missing" / "a.tar"), str(tmp_path)):
        with pytest.raises(errors.InvalidArgument, match="location"):
            ckpt.write_archive(location, config_dump={}, **paths)


def test_unpack_refuses_members_leaving_the_directory(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name in ("config.dump", "spec.dump", "../outside"):
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(errors.InvalidArgument, match=r"config\.image\.image"):
        ckpt.unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "outside").exists()


def _diff_archive(tmp: Path, member: str) -> ckpt.Unpacked:
    d = tmp / "u"
    (d / "checkpoint").mkdir(parents=True)
    with tarfile.open(d / "rootfs-diff.tar", "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"x\n"))
    return ckpt.Unpacked(d, {}, {})


def test_rootfs_diff_stays_inside_the_layer(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    ckpt.apply_rootfs_diff(_diff_archive(tmp_path / "a", f"/{tmp_path}/abs-target"), upper)
    assert not (tmp_path / "abs-target").exists()
    assert (upper / str(tmp_path).lstrip("/") / "abs-target").read_text() == "x\n"
    with pytest.raises(errors.InvalidArgument, match=r"rootfs-diff\.tar"):
        ckpt.apply_rootfs_diff(_diff_archive(tmp_path / "b", "../escaped"), upper)
    assert not (tmp_path / "escaped").exists()


def test_compression_follows_the_suffix() -> None:
    assert [ckpt.compression(p) for p in ("/a.tar", "/a.tar.gz", "/a.tgz", "/a.tar.bz2", "/a.tar.xz", "/a")] == \
        ["", "gz", "gz", "bz2", "xz", ""]
