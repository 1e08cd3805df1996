from pathlib import Path

import pytest

from shimd import errors, pod_limits
from shimd.api.runtime import v1 as cri


def test_combine_adds_overhead_to_the_containers_sum() -> None:
    res = cri.LinuxContainerResources(cpu_period=100_000, cpu_quota=150_000, cpu_shares=1536,
                                      memory_limit_in_bytes=256 << 20)
    ovh = cri.LinuxContainerResources(cpu_period=50_000, cpu_quota=5_000, cpu_shares=10, memory_limit_in_bytes=32 << 20)
    limits = pod_limits.combine(res, ovh)
    assert limits == pod_limits.PodLimits(cpu_shares=1546, cpu_quota=160_000, cpu_period=100_000,
                                          memory=288 << 20)


def test_combine_keeps_unlimited_unlimited() -> None:
    # Overhead alone never limits a pod whose containers are unlimited.
    overhead = cri.LinuxContainerResources(memory_limit_in_bytes=1 << 20)
    limits = pod_limits.combine(cri.LinuxContainerResources(), overhead)
    assert limits.empty


def _v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "cpu,memory"
    root.mkdir()
    for name in ("cpu.shares", "memory.limit_in_bytes"):
        (root / name).write_text("0")
    return root


def test_files_for_v1_and_v2(tmp_path: Path) -> None:
    limits = pod_limits.PodLimits(cpu_shares=1024, cpu_quota=50_000, cpu_period=100_000, memory=64 << 20)
    assert pod_limits._files(_v1_root(tmp_path), limits) == [
        ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000"), ("cpu.shares", "1024"),
        ("memory.limit_in_bytes", str(64 << 20))]
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert pod_limits._files(v2, limits) == [("cpu.max", "50000 100000"), ("cpu.weight", "39"),
                                             ("memory.max", str(64 << 20))]
    # A hybrid host's cgroup2 mount with no controllers gets nothing.
    (v2 / "cgroup.controllers").write_text("\n")
    assert pod_limits._files(v2, limits) == []


def test_write_errors_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _v1_root(tmp_path)
    monkeypatch.setattr(pod_limits.cgroups, "hierarchy_roots", lambda: [root])
    written = pod_limits.apply_sync("/shimd/podx", pod_limits.PodLimits(memory=8 << 20))
    assert written == {str(root / "shimd/podx/memory.limit_in_bytes"): str(8 << 20)}
    (root / "shimd/podx/memory.limit_in_bytes").unlink()
    (root / "shimd/podx/memory.limit_in_bytes").mkdir()  # writing it now fails (EISDIR)
    with pytest.raises(errors.ShimdError, match=r"resources\.memory_limit_in_bytes"):
        pod_limits.apply_sync("/shimd/podx", pod_limits.PodLimits(memory=8 << 20))
