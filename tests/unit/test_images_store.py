"""Snapshot commit markers (issue 16 items 2 and 9): only what the store committed counts."""

from __future__ import annotations

from pathlib import Path

from shimd.images.store import Layout

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_commit_marks_and_prepare_drops_unmarked(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "overlay")
    layout.prepare()
    tmp = layout.snapshot_tmp()
    tmp.mkdir()
    (tmp / "f").write_text("x")
    layout.commit_snapshot(tmp, A)
    assert layout.snapshot_ready(A) and (layout.snapshot(A) / "f").read_text() == "x"
    layout.snapshot(B).mkdir()                # there, but not committed by the store
    assert not layout.snapshot_ready(B)
    layout.prepare()
    assert layout.snapshot_ready(A) and not layout.snapshot(B).exists()
    # A commit over a leftover (renamed, never marked) directory replaces it.
    layout.snapshot(B).mkdir()
    (layout.snapshot(B) / "stale").write_text("x")
    tmp = layout.snapshot_tmp()
    tmp.mkdir()
    layout.commit_snapshot(tmp, B)
    assert layout.snapshot_ready(B) and not (layout.snapshot(B) / "stale").exists()
    assert layout.gc(set(), {A}) == (0, 1)
    assert not layout.snapshot_ready(B) and not (layout.committed / ("b" * 64)).exists()


def test_store_from_before_markers_is_adopted_once(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "overlay")
    layout.snapshots.mkdir(parents=True)
    layout.snapshot(A).mkdir()
    (layout.snapshots / "not-a-digest").mkdir()
    layout.prepare()
    assert layout.snapshot_ready(A)
    assert not (layout.snapshots / "not-a-digest").exists()
