"""What the runc shim reads from a bundle's spec on Create: its own PID namespace, start on create (and the spec)."""

from __future__ import annotations

import json
from pathlib import Path

from shimproto.messages import START_ON_CREATE_ANNOTATION
from shims.runc.service import _spec_facts


def bundle(tmp_path: Path, spec: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return str(tmp_path)


def test_own_pid_namespace_and_start_on_create(tmp_path: Path) -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
            "annotations": {START_ON_CREATE_ANNOTATION: "true"}}
    assert _spec_facts(bundle(tmp_path, spec)) == (True, True, spec)


def test_a_joined_pid_namespace_is_not_its_own(tmp_path: Path) -> None:
    spec = {"linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}, "annotations": {"a": "b"}}
    assert _spec_facts(bundle(tmp_path, spec)) == (False, False, spec)


def test_no_pid_namespace_at_all_shares_the_hosts(tmp_path: Path) -> None:
    spec = {"linux": {"namespaces": [{"type": "network"}]}}
    assert _spec_facts(bundle(tmp_path, spec)) == (False, False, spec)


def test_missing_or_unreadable_spec(tmp_path: Path) -> None:
    assert _spec_facts(str(tmp_path)) is None
    (tmp_path / "config.json").write_text("{not json")
    assert _spec_facts(str(tmp_path)) is None
    assert _spec_facts(bundle(tmp_path, [1, 2])) is None
