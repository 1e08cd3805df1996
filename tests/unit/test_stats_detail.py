"""The cAdvisor extras (shimd.stats.detail) on fake cgroup v1 and v2 trees."""

from __future__ import annotations

import os
from pathlib import Path

from shimd.stats import cgroupfs, detail


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_v1(tmp_path: Path) -> None:
    lay = cgroupfs.Layout({c: tmp_path / c for c in ("cpu", "cpuacct", "memory", "pids", "blkio")}, None)
    _write(tmp_path / "cpuacct/c/cpuacct.stat", f"user {3 * detail._TICKS}\nsystem {detail._TICKS // 2}\n")
    _write(tmp_path / "cpu/c/cpu.stat", "nr_periods 10\nnr_throttled 4\nthrottled_time 2500000000\n")
    _write(tmp_path / "cpu/c/cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cpu/c/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "cpu/c/cpu.shares", "2\n")
    m = tmp_path / "memory/c"
    _write(m / "memory.failcnt", "3\n")
    _write(m / "memory.kmem.usage_in_bytes", "4096\n")
    _write(m / "memory.stat", "mapped_file 1\ntotal_mapped_file 8192\n")
    _write(m / "memory.max_usage_in_bytes", "65536\n")
    _write(m / "memory.soft_limit_in_bytes", "9223372036854771712\n")
    _write(m / "memory.limit_in_bytes", "67108864\n")
    _write(tmp_path / "pids/c/pids.current", "5\n")
    _write(tmp_path / "pids/c/pids.max", "max\n")
    _write(tmp_path / "blkio/c/blkio.throttle.io_service_bytes_recursive",
           "254:0 Read 4096\n254:0 Write 8192\n254:0 Total 12288\nTotal 12288\n")
    _write(tmp_path / "blkio/c/blkio.throttle.io_serviced_recursive", "254:0 Read 1\n254:0 Write 2\nTotal 3\n")
    d = detail.read(lay, "/c", with_processes=False)
    assert (d.cpu_user_ns, d.cpu_system_ns) == (3_000_000_000, 500_000_000)
    assert (d.cfs_periods, d.cfs_throttled_periods, d.cfs_throttled_ns) == (10, 4, 2_500_000_000)
    assert (d.cpu_period, d.cpu_quota, d.cpu_shares) == (100000, None, 2)
    assert (d.memory_failcnt, d.memory_kernel, d.memory_mapped_file, d.memory_max_usage) == (3, 4096, 8192, 65536)
    # No memsw files (swap accounting off): memory+swap is bounded by the memory limit.
    assert (d.memory_reservation, d.memory_swap_limit) == (0, 67108864)
    assert (d.threads, d.threads_max) == (5, 0)
    [io] = d.io
    assert (io.major, io.minor, io.bytes["Write"], io.ios["Read"]) == (254, 0, 8192, 1)


def test_v2(tmp_path: Path) -> None:
    lay = cgroupfs.Layout({}, tmp_path)
    c = tmp_path / "c"
    _write(c / "cpu.stat", "usage_usec 9\nuser_usec 2000000\nsystem_usec 1000000\nnr_periods 7\nnr_throttled 1\n"
           "throttled_usec 1500\n")
    _write(c / "cpu.max", "50000 100000\n")
    _write(c / "cpu.weight", "100\n")
    _write(c / "memory.current", "100\n")
    _write(c / "memory.events", "low 0\nhigh 0\nmax 6\noom 0\noom_kill 0\n")
    _write(c / "memory.stat", "anon 1\nfile_mapped 77\nkernel 99\n")
    _write(c / "memory.peak", "1234\n")
    _write(c / "memory.low", "0\n")
    _write(c / "memory.max", "1048576\n")
    _write(c / "memory.swap.max", "0\n")
    _write(c / "pids.current", "2\n")
    _write(c / "pids.max", "100\n")
    _write(c / "io.stat", "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n")
    d = detail.read(lay, "c", with_processes=False)
    assert (d.cpu_user_ns, d.cpu_system_ns, d.cfs_periods, d.cfs_throttled_ns) == (2 * 10**9, 10**9, 7, 1_500_000)
    # runc maps shares 1024 to weight 39 and back about there; the default weight 100 is ~2600 shares.
    assert (d.cpu_period, d.cpu_quota, d.cpu_shares) == (100000, 50000, detail._weight_to_shares(100))
    assert (d.memory_failcnt, d.memory_kernel, d.memory_mapped_file, d.memory_max_usage) == (6, 99, 77, 1234)
    assert d.memory_swap_limit == 1048576
    assert (d.threads, d.threads_max) == (2, 100)
    [io] = d.io
    assert (io.major, io.minor, io.bytes["Read"], io.bytes["Write"], io.ios["Total"]) == (8, 0, 10, 20, 3)


def test_processes_and_idle_device(tmp_path: Path) -> None:
    lay = cgroupfs.Layout({"pids": tmp_path / "pids"}, None)
    _write(tmp_path / "pids/c/cgroup.procs", f"{os.getpid()}\n")
    d = detail.read(lay, "c", writable_dir=str(tmp_path))
    assert d.processes == 1 and d.file_descriptors and d.file_descriptors >= 3
    assert d.nofile_soft and d.nofile_soft > 0
    assert d.fs_limit_bytes and d.fs_inodes_free is not None
    st = os.stat(tmp_path).st_dev
    if detail.device_name(os.major(st), os.minor(st)):
        [io] = d.io
        assert io.bytes["Write"] == 0
