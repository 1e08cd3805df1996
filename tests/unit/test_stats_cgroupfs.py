"""cgroup counter parsing on fake v1 and v2 trees, disk usage and /proc/net/dev parsing."""

from __future__ import annotations

import os
from pathlib import Path

from shimd.stats import cgroupfs, diskusage, netdev


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_layout_detect_hybrid(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n"
        "31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory\n"
        "33 25 0:29 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "34 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    lay = cgroupfs.Layout.detect(mi)
    assert lay.v1 == {"cpu": Path("/sys/fs/cgroup/cpu"), "cpuacct": Path("/sys/fs/cgroup/cpuacct"),
                      "memory": Path("/sys/fs/cgroup/memory")}
    assert lay.unified == Path("/sys/fs/cgroup/unified")


def test_read_v1(tmp_path: Path) -> None:
    lay = cgroupfs.Layout({"cpuacct": tmp_path / "cpuacct", "memory": tmp_path / "memory",
                           "pids": tmp_path / "pids"}, tmp_path / "unified")
    _write(tmp_path / "cpuacct/a/b/cpuacct.usage", "123456789\n")
    m = tmp_path / "memory/a/b"
    _write(m / "memory.usage_in_bytes", "10000\n")
    _write(m / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(m / "memory.memsw.usage_in_bytes", "10500\n")
    _write(m / "memory.stat", "cache 5\nrss 7\ntotal_cache 600\ntotal_rss 7000\ntotal_inactive_file 3000\n"
           "total_pgfault 42\ntotal_pgmajfault 2\n")
    _write(m / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    _write(tmp_path / "pids/a/b/pids.current", "3\n")
    (tmp_path / "unified/a/b").mkdir(parents=True)
    s = cgroupfs.read(lay, "/a/b")
    assert s is not None
    assert s.cpu_usage_ns == 123456789
    assert (s.memory_usage, s.working_set, s.rss, s.cache) == (10000, 7000, 7000, 600)
    assert (s.page_faults, s.major_page_faults) == (42, 2)
    assert s.memory_limit is None  # v1's "unlimited"
    assert s.swap_usage == 500
    assert s.oom_events == 1
    assert s.pids == 3
    assert cgroupfs.read(lay, "/missing") is None


def test_read_v2(tmp_path: Path) -> None:
    lay = cgroupfs.Layout({}, tmp_path)
    d = tmp_path / "pod/ctr"
    _write(d / "cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n")
    _write(d / "memory.current", "8192\n")
    _write(d / "memory.max", "max\n")
    _write(d / "memory.stat", "anon 4096\nfile 4096\ninactive_file 1024\npgfault 9\npgmajfault 1\n")
    _write(d / "memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n")
    _write(d / "memory.swap.current", "0\n")
    _write(d / "pids.current", "5\n")
    s = cgroupfs.read(lay, "pod/ctr")
    assert s is not None
    assert s.cpu_usage_ns == 2_500_000
    assert (s.memory_usage, s.working_set, s.rss) == (8192, 7168, 4096)
    assert s.memory_limit is None and s.oom_events == 1 and s.pids == 5
    _write(d / "memory.max", "16777216\n")
    s = cgroupfs.read(lay, "pod/ctr")
    assert s is not None and s.memory_limit == 16777216


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "d" / "f", tmp_path / "d" / "g")
    os.symlink("/nonexistent", tmp_path / "d" / "l")
    u = diskusage.usage(str(tmp_path))
    assert u is not None
    assert u.inodes == 4  # root, d, f(=g), l
    assert 100_000 <= u.bytes < 200_000
    assert diskusage.usage(str(tmp_path / "nope")) is None


def test_netdev_parse() -> None:
    text = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
            "carrier compressed\n"
            "    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0 "
            "      0          0\n"
            "  eth0: 5000      40    2    0    0     0          0         0     7000      50    3    0    0     0 "
            "      0          0\n")
    ifaces = netdev.parse(text)
    assert [(i.name, i.rx_bytes, i.rx_errors, i.tx_bytes, i.tx_errors) for i in ifaces] == [
        ("lo", 100, 0, 100, 0), ("eth0", 5000, 2, 7000, 3)]


async def test_netdev_reads_own_namespace() -> None:
    ifaces = await netdev.read_netns("/proc/self/ns/net")
    assert all(i.name != "lo" for i in ifaces)


def test_cpu_rate_survives_concurrent_callers() -> None:
    from shimd.stats.collector import StatsCollector

    c = StatsCollector(store=None, cgroup_driver="cgroupfs", layout=cgroupfs.Layout({}, None))  # type: ignore[arg-type]
    sec = 1_000_000_000

    def rate(ts: int, usage: int) -> int | None:
        return c._rate("c/x", cgroupfs.Sample(timestamp_ns=ts, cpu_usage_ns=usage))

    assert rate(10 * sec, 5 * sec) is None  # the first sample has nothing to compare with
    assert rate(11 * sec, 5 * sec + sec // 2) == sec // 2  # half a core over one second
    # Callers right after (or with an older read finishing late) get that rate, not none or zero,
    # and do not move the remembered sample.
    assert rate(11 * sec + 3_000_000, 5 * sec + sec // 2) == sec // 2
    assert rate(11 * sec - 2_000_000, 5 * sec + sec // 2 - 1_000_000) == sec // 2
    assert rate(12 * sec, 5 * sec + sec // 2 + sec // 4) == sec // 4
    # A counter that went backwards (a container restarted under the same cgroup) starts over.
    assert rate(13 * sec, sec) is None
    assert rate(14 * sec, 2 * sec) == sec
