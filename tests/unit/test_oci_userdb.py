"""/etc/passwd and /etc/group lookups stay inside the image (issue 16 item 6): symlinks resolve in
the image's merged rootfs, as overlayfs would show it, and only a bounded regular file is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.oci import spec

PASSWD = b"root:x:0:0::/root:/bin/sh\ninimage:x:1000:1001::/:/bin/sh\n"
HOST_PASSWD = b"hostonly:x:4242:4242::/:/bin/sh\n"


def by_name(name: str) -> cri.LinuxContainerSecurityContext:
    return cri.LinuxContainerSecurityContext(run_as_username=name)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    d = tmp_path / "host"
    d.mkdir()
    (d / "passwd").write_bytes(HOST_PASSWD)
    return d


def layer(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    (d / "etc").mkdir(parents=True)
    return d


@pytest.mark.parametrize("target", ["abs-file", "rel-file", "dir"])
def test_symlink_out_of_the_rootfs_stays_inside(tmp_path: Path, host: Path, target: str) -> None:
    top = layer(tmp_path, "top")
    if target == "abs-file":
        (top / "etc/passwd").symlink_to(host / "passwd")
    elif target == "rel-file":
        (top / "etc/passwd").symlink_to("../" * 30 + str(host / "passwd").lstrip("/"))
    else:
        (top / "etc").rmdir()
        (top / "etc").symlink_to(host)
    with pytest.raises(errors.InvalidArgument, match="not found"):
        spec.resolve_user(by_name("hostonly"), "", [str(top)])


def test_symlink_resolves_in_the_merged_rootfs(tmp_path: Path, host: Path) -> None:
    # Upper layer: etc/passwd -> /data/../data/pw (absolute: the image's root); lower layer holds it.
    upper, lower = layer(tmp_path, "upper"), layer(tmp_path, "lower")
    (upper / "etc/passwd").symlink_to("/data/../data/pw")
    (lower / "data").mkdir()
    (lower / "data/pw").write_bytes(PASSWD)
    (lower / "etc/passwd").write_bytes(HOST_PASSWD)   # hidden by the upper layer's link
    user = spec.resolve_user(by_name("inimage"), "", [str(upper), str(lower)])
    assert user == {"uid": 1000, "gid": 1001, "additionalGids": [1001]}


def test_whiteout_and_opaque_dir_hide_lower_files(tmp_path: Path) -> None:
    upper, lower = layer(tmp_path, "upper"), layer(tmp_path, "lower")
    (lower / "etc/passwd").write_bytes(PASSWD)
    os.mknod(upper / "etc/passwd", stat.S_IFCHR, os.makedev(0, 0))   # overlay whiteout
    with pytest.raises(errors.InvalidArgument, match="not found"):
        spec.resolve_user(by_name("inimage"), "", [str(upper), str(lower)])
    os.unlink(upper / "etc/passwd")
    os.setxattr(upper / "etc", "trusted.overlay.opaque", b"y")
    with pytest.raises(errors.InvalidArgument, match="not found"):
        spec.resolve_user(by_name("inimage"), "", [str(upper), str(lower)])
    os.removexattr(upper / "etc", "trusted.overlay.opaque")
    assert spec.resolve_user(by_name("inimage"), "", [str(upper), str(lower)])["uid"] == 1000


ROOT = {"uid": 0, "gid": 0, "additionalGids": [0]}


def test_fifo_symlink_loop_and_oversized_file(tmp_path: Path) -> None:
    top = layer(tmp_path, "top")
    os.mkfifo(top / "etc/passwd")      # would block a plain open() for ever
    assert spec.resolve_user(cri.LinuxContainerSecurityContext(), "", [str(top)]) == ROOT
    os.unlink(top / "etc/passwd")
    (top / "etc/passwd").symlink_to("passwd")
    assert spec.resolve_user(cri.LinuxContainerSecurityContext(), "", [str(top)]) == ROOT
    os.unlink(top / "etc/passwd")
    with open(top / "etc/passwd", "wb") as f:
        f.truncate(spec.MAX_USER_DB + 1)
    with pytest.raises(errors.InvalidArgument, match="larger than"):
        spec.resolve_user(cri.LinuxContainerSecurityContext(), "", [str(top)])
