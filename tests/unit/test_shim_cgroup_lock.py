"""shims/runc/cgroup_lock.py: the shim's no-op move into its own cgroup (taken as runc starts)."""

from __future__ import annotations

import os
from pathlib import Path

from shims.runc import cgroup_lock


def test_the_move_targets_the_processs_own_cgroup_and_changes_nothing() -> None:
    procs = Path(cgroup_lock._find())
    assert procs.name == "cgroup.procs" and procs.is_file()
    assert str(os.getpid()) in procs.read_text().split()
    before = Path("/proc/self/cgroup").read_text()
    cgroup_lock.take()
    assert Path("/proc/self/cgroup").read_text() == before
    assert str(os.getpid()) in procs.read_text().split()
