"""shims/runc/cgroup_kill.py: every process of a real freezer cgroup signalled, and the states it leaves
to runc (runc's state it does not know, a freezer that is not thawed, no v1 freezer)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shims.runc import cgroup_kill

FREEZER = Path("/sys/fs/cgroup/freezer")
pytestmark = pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists() or os.geteuid() != 0,
                                reason="needs root and a cgroup v1 freezer hierarchy")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    d = FREEZER / f"shimd-unit-{secrets.token_hex(4)}"
    d.mkdir()
    try:
        yield d
    finally:
        (d / "freezer.state").write_text("THAWED")
        for sub in sorted(d.rglob("*"), reverse=True):
            if sub.is_dir():
                sub.rmdir()
        d.rmdir()


def state_for(root: Path, cid: str, freezer: Path) -> None:
    (root / cid).mkdir(parents=True)
    (root / cid / "state.json").write_text(json.dumps({"cgroup_paths": {"freezer": str(freezer)}}))


def start_in(cgroup: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["sleep", "1000"])
    (cgroup / "cgroup.procs").write_text(str(p.pid))
    return p


def test_every_process_of_the_cgroup_and_its_sub_cgroups_gets_the_signal_and_it_is_thawed(
        tmp_path: Path, cgroup: Path) -> None:
    (cgroup / "sub").mkdir()
    procs = [start_in(cgroup), start_in(cgroup / "sub")]
    outsider = subprocess.Popen(["sleep", "1000"])
    try:
        state_for(tmp_path, "c1", cgroup)
        assert cgroup_kill.signal_all(str(tmp_path), "c1", signal.SIGTERM) == ""
        for p in procs:
            assert p.wait(timeout=10) == -signal.SIGTERM
        assert outsider.poll() is None
        assert (cgroup / "freezer.state").read_text().strip() == "THAWED"
    finally:
        for p in [*procs, outsider]:
            p.kill()
            p.wait(timeout=10)


def test_a_frozen_cgroup_is_left_to_runc_untouched(tmp_path: Path, cgroup: Path) -> None:
    p = start_in(cgroup)
    try:
        (cgroup / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (cgroup / "freezer.state").read_text().strip() != "FROZEN":  # FREEZING while tasks settle
            assert time.monotonic() < deadline, "the test's cgroup did not freeze"
            time.sleep(0.01)
        state_for(tmp_path, "c1", cgroup)
        assert "not thawed" in cgroup_kill.signal_all(str(tmp_path), "c1", signal.SIGKILL)
        assert (cgroup / "freezer.state").read_text().strip() == "FROZEN"  # still paused
        assert p.poll() is None
    finally:
        (cgroup / "freezer.state").write_text("THAWED")
        p.kill()
        p.wait(timeout=10)


def test_without_a_v1_freezer_path_or_with_unknown_state_runc_does_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "state.json").write_text(json.dumps({"cgroup_paths": {"memory": "/sys/fs/cgroup/memory/x"}}))
    assert "freezer mount" in cgroup_kill.signal_all(str(tmp_path), "a", signal.SIGKILL)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "state.json").write_text(json.dumps({"cgroup_paths": {"freezer": "/tmp/x"}}))
    assert "not under a cgroup mount" in cgroup_kill.signal_all(str(tmp_path), "b", signal.SIGKILL)
    assert "unreadable" in cgroup_kill.signal_all(str(tmp_path), "missing", signal.SIGKILL)
