"""shims/runc/reaped_delete.py: which specs it takes, and state it must leave to runc untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from shims.runc import reaped_delete

PLAIN: dict[str, Any] = {
    "process": {"args": ["sleep", "1"]},
    "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
              "cgroupsPath": "/kubepods/pod1/c1"},
}


def variant(change: str) -> dict[str, Any]:
    spec = copy.deepcopy(PLAIN)
    linux = spec["linux"]
    if change == "pid joined":
        linux["namespaces"][0]["path"] = "/proc/1/ns/pid"
    elif change == "no pid":
        linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "pid"]
    elif change == "poststop":
        spec["hooks"] = {"poststop": [{"path": "/bin/true"}]}
    elif change == "intelRdt":
        linux["intelRdt"] = {"closID": "x"}
    return spec


@pytest.mark.parametrize("change", ["none", "pid joined", "no pid"])
def test_a_plain_spec_for_runc_is_taken(change: str) -> None:
    # Without a PID namespace of its own, remove() looks for processes left in the cgroup first.
    assert reaped_delete.spec_allows(variant(change), "runc", False)
    assert reaped_delete.spec_allows(variant(change), "/usr/local/sbin/runc", False)
    # hooks runc runs before or while the container lives are no concern of its delete
    assert reaped_delete.spec_allows({**PLAIN, "hooks": {"prestart": [{"path": "/bin/true"}]}}, "runc", False)


@pytest.mark.parametrize("change", ["poststop", "intelRdt"])
def test_specs_whose_delete_does_more_go_to_runc(change: str) -> None:
    assert not reaped_delete.spec_allows(variant(change), "runc", False)


@pytest.mark.parametrize("binary,systemd", [("crun", False), ("/usr/bin/runsc", False), ("runc", True)])
def test_other_runtimes_and_systemd_cgroups_go_to_runc(binary: str, systemd: bool) -> None:
    assert not reaped_delete.spec_allows(PLAIN, binary, systemd)


def write_state(root: Path, cid: str, state: Any) -> Path:
    d = root / cid
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(state))
    return d


@pytest.mark.parametrize("state,reason", [
    (None, "unreadable"),
    ("not json", "unreadable"),
    ([1, 2], "plain cgroupfs layout"),
    ({"cgroup_paths": "x"}, "plain cgroupfs layout"),
    ({"cgroup_paths": {}, "intel_rdt_path": "/sys/fs/resctrl/c1"}, "plain cgroupfs layout"),
    ({"cgroup_paths": {}, "rootless": True}, "plain cgroupfs layout"),
    ({"cgroup_paths": {"memory": "/tmp/not-a-cgroup"}}, "not under a cgroup mount"),
    ({"cgroup_paths": {"memory": "/sys/fs/cgroup/memory/../../../tmp"}}, "not under a cgroup mount"),
    ({"cgroup_paths": {"memory": 7}}, "not under a cgroup mount"),
])
def test_state_it_does_not_know_is_left_to_runc(tmp_path: Path, state: Any, reason: str) -> None:
    if state is None:
        (tmp_path / "c1").mkdir()  # a directory without state.json: runc's own delete explains it
        d = tmp_path / "c1"
    elif state == "not json":
        d = tmp_path / "c1"
        d.mkdir()
        (d / "state.json").write_text("{")
    else:
        d = write_state(tmp_path, "c1", state)
    assert reason in reaped_delete.remove(str(tmp_path), "c1", True)
    assert d.exists()  # nothing removed: runc gets to see what it made


@pytest.mark.parametrize("cid", ["", ".", "..", "a/b"])
def test_ids_that_are_not_a_plain_name_are_refused(tmp_path: Path, cid: str) -> None:
    assert "not a plain name" in reaped_delete.remove(str(tmp_path), cid, True)


def test_state_without_cgroups_is_removed(tmp_path: Path) -> None:
    d = write_state(tmp_path, "c1", {"cgroup_paths": {}, "intel_rdt_path": ""})
    assert reaped_delete.remove(str(tmp_path), "c1", True) == ""
    assert not d.exists()


def test_a_state_directory_with_more_than_runc_keeps_is_reported(tmp_path: Path) -> None:
    d = write_state(tmp_path, "c1", {"cgroup_paths": {}})
    (d / "sub").mkdir()
    assert "could not be removed" in reaped_delete.remove(str(tmp_path), "c1", True)
