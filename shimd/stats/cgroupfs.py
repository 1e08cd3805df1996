"""Reads usage counters of one cgroup from cgroup v1 controllers or cgroup v2 (hybrid hosts have both).

Synchronous on purpose: callers run it in a worker thread. A controller that is not mounted, or a
cgroup that vanished between listing and reading, yields None fields rather than an error, because
stats are best-effort snapshots of processes that may exit at any moment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# cgroup v1 reports "no limit" as a page-aligned LONG_MAX; anything this large is unlimited.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Layout:
    """Where each controller lives: v1 mount points by controller name, and the cgroup2 mount."""

    v1: dict[str, Path]
    unified: Path | None

    @classmethod
    def detect(cls, mountinfo: Path = MOUNTINFO) -> Layout:
        v1: dict[str, Path] = {}
        unified: Path | None = None
        try:
            lines = mountinfo.read_text().splitlines()
        except OSError:
            return cls({}, None)
        for line in lines:
            left, _, right = line.partition(" - ")
            fields = right.split(" ")
            if len(fields) < 3:
                continue
            mount_point = Path(left.split(" ")[4])
            if fields[0] == "cgroup2":
                unified = mount_point
            elif fields[0] == "cgroup":
                for opt in fields[2].split(","):
                    if opt in ("cpu", "cpuacct", "memory", "pids", "cpuset", "blkio"):
                        v1.setdefault(opt, mount_point)
        return cls(v1, unified)


@dataclass
class Sample:
    timestamp_ns: int
    cpu_usage_ns: int | None = None
    memory_usage: int | None = None
    working_set: int | None = None
    rss: int | None = None
    cache: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    memory_limit: int | None = None  # None: unlimited
    swap_usage: int | None = None
    pids: int | None = None
    oom_events: int | None = None


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def read_kv(p: Path) -> dict[str, int]:
    """A flat keyed file ("key value" lines, as memory.stat); unreadable lines and files count nothing."""
    out: dict[str, int] = {}
    try:
        text = p.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v.strip())
        except ValueError:
            continue
    return out


def _v1(layout: Layout, rel: str, s: Sample) -> bool:
    found = False
    acct = layout.v1.get("cpuacct")
    if acct is not None and (acct / rel).is_dir():
        s.cpu_usage_ns = _read_int(acct / rel / "cpuacct.usage")
        found = True
    mem_root = layout.v1.get("memory")
    if mem_root is not None and (mem_root / rel).is_dir():
        found = True
        d = mem_root / rel
        s.memory_usage = _read_int(d / "memory.usage_in_bytes")
        stat = read_kv(d / "memory.stat")
        # total_* include child cgroups, which matters for pod-level cgroups.
        inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        if s.memory_usage is not None:
            s.working_set = max(0, s.memory_usage - inactive)
        s.rss = stat.get("total_rss", stat.get("rss"))
        s.cache = stat.get("total_cache", stat.get("cache"))
        s.page_faults = stat.get("total_pgfault", stat.get("pgfault"))
        s.major_page_faults = stat.get("total_pgmajfault", stat.get("pgmajfault"))
        limit = _read_int(d / "memory.limit_in_bytes")
        s.memory_limit = limit if limit is not None and limit < _V1_UNLIMITED else None
        memsw = _read_int(d / "memory.memsw.usage_in_bytes")
        if memsw is not None and s.memory_usage is not None:
            s.swap_usage = max(0, memsw - s.memory_usage)
        oom = read_kv(d / "memory.oom_control")
        s.oom_events = oom.get("oom_kill")
    pids_root = layout.v1.get("pids")
    if pids_root is not None and (pids_root / rel).is_dir():
        s.pids = _read_int(pids_root / rel / "pids.current")
        found = True
    return found


def _v2(layout: Layout, rel: str, s: Sample) -> bool:
    if layout.unified is None:
        return False
    d = layout.unified / rel
    if not d.is_dir():
        return False
    found = False
    if s.cpu_usage_ns is None:
        cpu = read_kv(d / "cpu.stat")
        if "usage_usec" in cpu:
            s.cpu_usage_ns = cpu["usage_usec"] * 1000
            found = True
    if s.memory_usage is None and (d / "memory.current").exists():
        found = True
        s.memory_usage = _read_int(d / "memory.current")
        stat = read_kv(d / "memory.stat")
        if s.memory_usage is not None:
            s.working_set = max(0, s.memory_usage - stat.get("inactive_file", 0))
        s.rss = stat.get("anon")
        s.cache = stat.get("file")
        s.page_faults = stat.get("pgfault")
        s.major_page_faults = stat.get("pgmajfault")
        s.memory_limit = _read_int(d / "memory.max")
        s.swap_usage = _read_int(d / "memory.swap.current")
        s.oom_events = read_kv(d / "memory.events").get("oom_kill")
    if s.pids is None and (d / "pids.current").exists():
        s.pids = _read_int(d / "pids.current")
        found = True
    return found


def read(layout: Layout, rel: str) -> Sample | None:
    """Counters of cgroup `rel` (relative to each hierarchy root); None when it exists nowhere."""
    rel = rel.strip("/")
    s = Sample(timestamp_ns=time.time_ns())
    found_v1 = _v1(layout, rel, s)
    # v2 fills whatever v1 did not provide (pure v2 hosts, or controllers moved to cgroup2).
    found_v2 = _v2(layout, rel, s)
    return s if (found_v1 or found_v2) else None


def pids_in(layout: Layout, rel: str) -> list[int]:
    """Processes of the cgroup (any hierarchy that has it); used to find a process in a pod's netns."""
    rel = rel.strip("/")
    roots = list(layout.v1.values()) + ([layout.unified] if layout.unified else [])
    for root in roots:
        try:
            text = (root / rel / "cgroup.procs").read_text()
        except OSError:
            continue
        return [int(x) for x in text.split()]
    return []
