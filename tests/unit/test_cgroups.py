from pathlib import Path

import pytest

from shimd import cgroups


def test_cgroupfs_paths() -> None:
    assert cgroups.container_path("cgroupfs", "/kubepods/besteffort/podabc", "c1") == "/kubepods/besteffort/podabc/c1"
    assert cgroups.container_path("cgroupfs", "", "c1") == "/shimd/c1"
    assert cgroups.default_pod_parent("cgroupfs", "f" * 64) == "/shimd/pod" + "f" * 16
    assert cgroups.relative_path("cgroupfs", "/a/b") == "/a/b"


def test_systemd_paths() -> None:
    parent = "kubepods-besteffort-pod1234.slice"
    assert cgroups.container_path("systemd", parent, "c1") == f"{parent}:shimd:c1"
    assert cgroups.systemd_slice_to_path(parent) == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice")
    assert cgroups.relative_path("systemd", f"{parent}:shimd:c1") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/shimd-c1.scope")
    assert cgroups.systemd_slice_to_path("-.slice") == "/"
    # A pod's own parent slice (what shimd makes for a pod that came without one).
    assert cgroups.relative_path("systemd", "shimd-podabc.slice") == "/shimd.slice/shimd-podabc.slice"


def test_hierarchy_roots_on_this_host() -> None:
    roots = cgroups.hierarchy_roots()
    assert roots, "a cgroup hierarchy must be mounted"
    assert all(r.is_dir() for r in roots)


def test_hugetlb_usable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    hugetlb = "33 31 0:30 / /sys/fs/cgroup/hugetlb rw,relatime - cgroup cgroup rw,hugetlb\n"
    unified_root = tmp_path / "unified"
    unified_root.mkdir()
    unified = f"41 31 0:38 / {unified_root} rw,relatime - cgroup2 cgroup2 rw\n"
    mountinfo = tmp_path / "mountinfo"
    monkeypatch.setattr(cgroups, "MOUNTINFO", mountinfo)
    (unified_root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    cases = [
        (v1 + unified, False),  # hybrid, as on this host: runc uses v1, which has no hugetlb hierarchy
        (v1 + hugetlb + unified, True),
        (unified, True),  # cgroup v2 only, with the controller
    ]
    for text, usable in cases:
        mountinfo.write_text(text)
        assert cgroups.hugetlb_usable() is usable, text
    (unified_root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroups.hugetlb_usable() is False


def test_hierarchy_roots_are_read_again_after_their_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n")
    monkeypatch.setattr(cgroups, "MOUNTINFO", mountinfo)
    clock = [1000.0]
    monkeypatch.setattr(cgroups.time, "monotonic", lambda: clock[0])
    assert cgroups.hierarchy_roots() == [Path("/sys/fs/cgroup/cpu")]
    mountinfo.write_text(mountinfo.read_text() + "33 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert cgroups.hierarchy_roots() == [Path("/sys/fs/cgroup/cpu")]  # within the TTL: the cached list
    cgroups.hierarchy_roots().append(Path("/elsewhere"))  # a caller's copy, not the cache
    clock[0] += cgroups.ROOTS_TTL
    assert cgroups.hierarchy_roots() == [Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/memory")]
