"""fsutil's atomic writes: records are fsynced, files under daemon.state only renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shimd import fsutil


@pytest.mark.parametrize("durable, fsyncs", [(True, 2), (False, 0)])
def test_only_durable_writes_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool,
                                   fsyncs: int) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    target = tmp_path / "d" / "config.json"
    fsutil.write_atomic_sync(target, b"old")
    calls.clear()
    fsutil.write_atomic_sync(target, b"{}", 0o644, durable=durable)
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o777 == 0o644
    assert len(calls) == fsyncs  # the file, then its directory
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]  # no temp file left
