"""The rest of cAdvisor's container metric set, read from one container's cgroups and processes.

What kubelet's /metrics/cadvisor shows beyond the CRI stats messages: CFS throttling, user/system
CPU time, block I/O per device, memory failcnt/kernel/mapped/peak, thread counts and limits, open
file descriptors and sockets, the soft open-files limit, and the limits the cgroup enforces.
cgroup v1 controllers are preferred where mounted; cgroup v2 fills in the rest (as cgroupfs.read).

Synchronous on purpose: callers run it in a worker thread. Missing files yield None, not errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shimd.stats.cgroupfs import Layout, read_kv

# cgroup v1 reports "no limit" as a page-aligned LONG_MAX.
_V1_UNLIMITED = 1 << 62
# USER_HZ: cpuacct.stat counts in clock ticks.
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class DeviceIo:
    """One block device's I/O by the cgroup: bytes and operations per kind (Read, Write, Sync, ...)."""

    major: int
    minor: int
    name: str
    bytes: dict[str, int]
    ios: dict[str, int]


@dataclass
class Detail:
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    cfs_periods: int | None = None
    cfs_throttled_periods: int | None = None
    cfs_throttled_ns: int | None = None
    cpu_period: int | None = None  # microseconds
    cpu_quota: int | None = None  # microseconds; None: no quota
    cpu_shares: int | None = None
    memory_failcnt: int | None = None
    memory_kernel: int | None = None
    memory_mapped_file: int | None = None
    memory_cache: int | None = None
    memory_max_usage: int | None = None
    memory_reservation: int | None = None  # 0: none
    memory_swap_limit: int | None = None  # memory+swap, 0: unlimited
    threads: int | None = None
    threads_max: int | None = None  # 0: unlimited
    processes: int | None = None
    file_descriptors: int | None = None
    sockets: int | None = None
    nofile_soft: int | None = None
    io: list[DeviceIo] = field(default_factory=list)
    fs_inodes_free: int | None = None
    fs_limit_bytes: int | None = None


def _text(p: Path) -> str | None:
    try:
        return p.read_text()
    except OSError:
        return None


def _int(p: Path, unlimited: int | None = None) -> int | None:
    """An integer file; "max" and v1's LONG_MAX read as `unlimited`."""
    text = _text(p)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return unlimited
    try:
        value = int(text)
    except ValueError:
        return None
    return unlimited if value >= _V1_UNLIMITED else value


def _dir(layout: Layout, controller: str, rel: str) -> Path | None:
    root = layout.v1.get(controller)
    if root is not None and (root / rel).is_dir():
        return root / rel
    return None


def _v2_dir(layout: Layout, rel: str, probe: str) -> Path | None:
    if layout.unified is None:
        return None
    d = layout.unified / rel
    return d if (d / probe).exists() else None


def device_name(major: int, minor: int) -> str:
    """/dev/NAME of a block device, as cAdvisor labels it ("" when sysfs does not know it)."""
    for line in (_text(Path(f"/sys/dev/block/{major}:{minor}/uevent")) or "").splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line[len("DEVNAME="):]
    return ""


def _v1_io(d: Path) -> list[DeviceIo]:
    """blkio.throttle.*_recursive: "MAJ:MIN Op N" lines (the throttle files are kept with any policy)."""
    tables: dict[str, dict[tuple[int, int], dict[str, int]]] = {"bytes": {}, "ios": {}}
    for kind, name in (("bytes", "blkio.throttle.io_service_bytes_recursive"),
                       ("ios", "blkio.throttle.io_serviced_recursive")):
        for line in (_text(d / name) or "").splitlines():
            parts = line.split()
            if len(parts) != 3 or ":" not in parts[0]:
                continue
            major, _, minor = parts[0].partition(":")
            try:
                tables[kind].setdefault((int(major), int(minor)), {})[parts[1]] = int(parts[2])
            except ValueError:
                continue
    keys = sorted(set(tables["bytes"]) | set(tables["ios"]))
    return [DeviceIo(ma, mi, device_name(ma, mi), tables["bytes"].get((ma, mi), {}), tables["ios"].get((ma, mi), {}))
            for ma, mi in keys]


def _v2_io(d: Path) -> list[DeviceIo]:
    """io.stat: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N dbytes=N dios=N" (named as v1's operations)."""
    out = []
    for line in (_text(d / "io.stat") or "").splitlines():
        dev, *pairs = line.split()
        major, _, minor = dev.partition(":")
        vals = {}
        for pair in pairs:
            k, _, v = pair.partition("=")
            if v.isdigit():
                vals[k] = int(v)
        try:
            ma, mi = int(major), int(minor)
        except ValueError:
            continue
        b = {"Read": vals.get("rbytes", 0), "Write": vals.get("wbytes", 0), "Discard": vals.get("dbytes", 0)}
        n = {"Read": vals.get("rios", 0), "Write": vals.get("wios", 0), "Discard": vals.get("dios", 0)}
        b["Total"], n["Total"] = b["Read"] + b["Write"], n["Read"] + n["Write"]
        out.append(DeviceIo(ma, mi, device_name(ma, mi), b, n))
    return out


def _weight_to_shares(weight: int) -> int:
    """cgroup v2 cpu.weight [1, 10000] back to v1 shares [2, 262144] (the inverse of runc's mapping)."""
    return 2 + (weight - 1) * 262142 // 9999


def _cpu(layout: Layout, rel: str, out: Detail) -> None:
    acct = _dir(layout, "cpuacct", rel)
    if acct is not None:
        st = read_kv(acct / "cpuacct.stat")
        if "user" in st:
            out.cpu_user_ns = st["user"] * 1_000_000_000 // _TICKS
        if "system" in st:
            out.cpu_system_ns = st["system"] * 1_000_000_000 // _TICKS
    cpu = _dir(layout, "cpu", rel)
    if cpu is not None:
        st = read_kv(cpu / "cpu.stat")
        out.cfs_periods, out.cfs_throttled_periods = st.get("nr_periods"), st.get("nr_throttled")
        out.cfs_throttled_ns = st.get("throttled_time")
        out.cpu_period = _int(cpu / "cpu.cfs_period_us")
        quota = _int(cpu / "cpu.cfs_quota_us")
        out.cpu_quota = quota if quota is not None and quota > 0 else None
        out.cpu_shares = _int(cpu / "cpu.shares")
    v2 = _v2_dir(layout, rel, "cpu.stat")
    if v2 is None:
        return
    st = read_kv(v2 / "cpu.stat")
    if out.cpu_user_ns is None and "user_usec" in st:
        out.cpu_user_ns, out.cpu_system_ns = st["user_usec"] * 1000, st.get("system_usec", 0) * 1000
    if cpu is None:
        out.cfs_periods, out.cfs_throttled_periods = st.get("nr_periods"), st.get("nr_throttled")
        if "throttled_usec" in st:
            out.cfs_throttled_ns = st["throttled_usec"] * 1000
        quota_s, _, period_s = (_text(v2 / "cpu.max") or "").strip().partition(" ")
        if period_s.isdigit():
            out.cpu_period = int(period_s)
            out.cpu_quota = int(quota_s) if quota_s.isdigit() else None
        weight = _int(v2 / "cpu.weight")
        if weight is not None:
            out.cpu_shares = _weight_to_shares(weight)


def _memory(layout: Layout, rel: str, out: Detail) -> None:
    mem = _dir(layout, "memory", rel)
    if mem is not None:
        out.memory_failcnt = _int(mem / "memory.failcnt")
        out.memory_kernel = _int(mem / "memory.kmem.usage_in_bytes")
        st = read_kv(mem / "memory.stat")
        out.memory_mapped_file = st.get("total_mapped_file", st.get("mapped_file"))
        out.memory_cache = st.get("total_cache", st.get("cache"))
        out.memory_max_usage = _int(mem / "memory.max_usage_in_bytes")
        out.memory_reservation = _int(mem / "memory.soft_limit_in_bytes", unlimited=0)
        # Without swap accounting (no memsw files) memory+swap is bounded by the memory limit alone.
        swap = _int(mem / "memory.memsw.limit_in_bytes", unlimited=0)
        out.memory_swap_limit = swap if swap is not None else _int(mem / "memory.limit_in_bytes", unlimited=0)
        return
    v2 = _v2_dir(layout, rel, "memory.current")
    if v2 is None:
        return
    out.memory_failcnt = read_kv(v2 / "memory.events").get("max")
    st = read_kv(v2 / "memory.stat")
    out.memory_kernel = st.get("kernel", st.get("kernel_stack"))
    out.memory_mapped_file = st.get("file_mapped")
    out.memory_cache = st.get("file")  # cAdvisor's cache on cgroup v2
    out.memory_max_usage = _int(v2 / "memory.peak")
    out.memory_reservation = _int(v2 / "memory.low", unlimited=0)
    # v2 limits swap alone; the metric is memory+swap as on v1 (0: unlimited). No swap.max file means
    # no swap accounting, so memory.max bounds both.
    limit = _int(v2 / "memory.max", unlimited=0)
    swap = _int(v2 / "memory.swap.max", unlimited=-1)
    if not limit or swap == -1:
        out.memory_swap_limit = 0
    else:
        out.memory_swap_limit = limit + (swap or 0)


def _pids(layout: Layout, rel: str, out: Detail) -> None:
    d = _dir(layout, "pids", rel) or _v2_dir(layout, rel, "pids.current")
    if d is not None:
        out.threads = _int(d / "pids.current")
        out.threads_max = _int(d / "pids.max", unlimited=0)


def procs(layout: Layout, rel: str) -> list[int]:
    roots = [r for r in (layout.v1.get("pids"), layout.v1.get("memory"), layout.v1.get("cpu"), layout.unified) if r]
    for root in roots:
        text = _text(root / rel / "cgroup.procs")
        if text is not None:
            return [int(x) for x in text.split() if x.isdigit()]
    return []


def _processes(pids: list[int], out: Detail) -> None:
    """Open descriptors and sockets summed over the processes (as cAdvisor), and the first one's soft
    RLIMIT_NOFILE. Processes may exit while they are read: whatever vanished simply counts nothing."""
    fds = sockets = 0
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            continue
        fds += len(names)
        for name in names:
            try:
                if os.readlink(f"{base}/{name}").startswith("socket:"):
                    sockets += 1
            except OSError:
                continue
    out.processes, out.file_descriptors, out.sockets = len(pids), fds, sockets
    for pid in pids[:1]:
        for line in (_text(Path(f"/proc/{pid}/limits")) or "").splitlines():
            if line.startswith("Max open files"):
                soft = line[len("Max open files"):].split()[0]
                out.nofile_soft = int(soft) if soft.isdigit() else None


def _filesystem(path: str, out: Detail) -> None:
    try:
        st = os.statvfs(path)
    except OSError:
        return
    out.fs_inodes_free = st.f_favail
    out.fs_limit_bytes = st.f_blocks * st.f_frsize


def read(layout: Layout, rel: str, writable_dir: str = "", with_processes: bool = True) -> Detail:
    """Everything above for cgroup `rel`; writable_dir is the container's writable layer."""
    rel = rel.strip("/")
    out = Detail()
    _cpu(layout, rel, out)
    _memory(layout, rel, out)
    _pids(layout, rel, out)
    blkio = _dir(layout, "blkio", rel)
    if blkio is not None:
        out.io = _v1_io(blkio)
    elif (v2 := _v2_dir(layout, rel, "io.stat")) is not None:
        out.io = _v2_io(v2)
    if writable_dir:
        _filesystem(writable_dir, out)
        if not out.io:
            out.io = _idle_device(writable_dir)
    if with_processes:
        _processes(procs(layout, rel), out)
    return out


def _idle_device(path: str) -> list[DeviceIo]:
    """The writable layer's block device with nothing counted, when the cgroup lists no device at all.

    Since Linux 5.x the v1 blkio.throttle.* files only count I/O of cgroups that have a throttle rule
    (they read "Total 0" otherwise), and io.stat lists a device only after its first I/O: zero is what
    the kernel accounted, and kubelet still gets the series it expects for the container's device.
    """
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return []
    major, minor = os.major(dev), os.minor(dev)
    name = device_name(major, minor)
    if not name:  # overlay, tmpfs, ...: no block device behind the layer
        return []
    zeros = dict.fromkeys(("Read", "Write", "Sync", "Async", "Discard", "Total"), 0)
    return [DeviceIo(major, minor, name, dict(zeros), dict(zeros))]
