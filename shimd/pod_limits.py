"""Pod-level limits (UpdatePodSandboxResources, LinuxPodSandboxConfig.resources) on a pod cgroup shimd owns.

kubelet sizes the pod cgroups it creates itself, so shimd touches only the parent it made for a pod
that came without one (crictl, tests): there the sum of the containers' resources plus the pod
overhead becomes the cgroup's CPU and memory limits, on cgroup v1 hierarchies and on cgroup2.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from shimd import cgroups, errors
from shimd.api.runtime import v1 as cri

DEFAULT_PERIOD = 100_000


@dataclass(frozen=True)
class PodLimits:
    cpu_shares: int = 0  # 0: leave as is
    cpu_quota: int = 0  # <= 0: leave as is
    cpu_period: int = 0
    memory: int = 0  # 0: leave as is

    @property
    def empty(self) -> bool:
        return not (self.cpu_shares or self.cpu_quota > 0 or self.memory)


def combine(resources: cri.LinuxContainerResources | None, overhead: cri.LinuxContainerResources | None) -> PodLimits:
    """The pod's limits: its containers' sum plus the overhead; a value the sum leaves unlimited stays so."""
    res = resources if resources is not None else cri.LinuxContainerResources()
    ovh = overhead if overhead is not None else cri.LinuxContainerResources()
    period = res.cpu_period or DEFAULT_PERIOD
    quota = 0
    if res.cpu_quota > 0:
        # The overhead's quota is per its own period: scaled to the pod's.
        quota = res.cpu_quota + (ovh.cpu_quota * period // (ovh.cpu_period or DEFAULT_PERIOD)
                                 if ovh.cpu_quota > 0 else 0)
    return PodLimits(
        cpu_shares=res.cpu_shares + ovh.cpu_shares if res.cpu_shares else 0,
        cpu_quota=quota, cpu_period=period if quota else 0,
        memory=res.memory_limit_in_bytes + max(ovh.memory_limit_in_bytes, 0) if res.memory_limit_in_bytes > 0 else 0,
    )


def _shares_to_weight(shares: int) -> int:
    # The conversion runc and the kernel documentation use between cgroup v1 shares and v2 weight.
    return 1 + ((max(shares, 2) - 2) * 9999) // 262142


def _files(root: Path, limits: PodLimits) -> list[tuple[str, str]]:
    """(file, value) pairs in the order they must be written, for the hierarchy mounted at root."""
    out: list[tuple[str, str]] = []
    if (root / "cgroup.controllers").exists():  # cgroup2; on hybrid hosts it may hold no controllers
        enabled = set((root / "cgroup.controllers").read_text().split())
        if "cpu" in enabled:
            if limits.cpu_quota > 0:
                out.append(("cpu.max", f"{limits.cpu_quota} {limits.cpu_period}"))
            if limits.cpu_shares:
                out.append(("cpu.weight", str(_shares_to_weight(limits.cpu_shares))))
        if "memory" in enabled and limits.memory:
            out.append(("memory.max", str(limits.memory)))
        return out
    if (root / "cpu.shares").exists():
        if limits.cpu_quota > 0:
            out += [("cpu.cfs_period_us", str(limits.cpu_period)), ("cpu.cfs_quota_us", str(limits.cpu_quota))]
        if limits.cpu_shares:
            out.append(("cpu.shares", str(limits.cpu_shares)))
    if (root / "memory.limit_in_bytes").exists() and limits.memory:
        out.append(("memory.limit_in_bytes", str(limits.memory)))
    return out


def apply_sync(rel: str, limits: PodLimits) -> dict[str, str]:
    """Write the limits into the pod cgroup at rel (made where missing); returns {path: value} written."""
    written: dict[str, str] = {}
    if limits.empty:
        return written
    for root in cgroups.hierarchy_roots():
        files = _files(root, limits)
        if not files:
            continue
        target = root / rel.strip("/")
        os.makedirs(target, exist_ok=True)
        for name, value in files:
            path = target / name
            try:
                path.write_text(value)
            except OSError as e:
                raise _explain(e, name, value) from None
            written[str(path)] = value
    return written


def _explain(e: OSError, name: str, value: str) -> errors.ShimdError:
    field = "resources.memory_limit_in_bytes" if name.startswith("memory") else (
        "resources.cpu_shares" if name in ("cpu.shares", "cpu.weight") else "resources.cpu_quota")
    if e.errno == errno.EBUSY:
        return errors.FailedPrecondition(f"{field}: {value} is below what the pod uses now ({name})")
    if e.errno == errno.EINVAL:
        return errors.InvalidArgument(f"{field}: the kernel refused {value} for {name} (a container's own "
                                      "limit may be larger than the pod's)")
    return errors.ShimdError(f"{field}: writing {name}: {e.strerror}")
