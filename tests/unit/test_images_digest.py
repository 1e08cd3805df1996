"""Digest validation (issue 16 items 1 and 2): only the OCI image spec's exact forms become file names."""

from __future__ import annotations

from pathlib import Path

import pytest

from shimd import errors
from shimd.images import digest
from shimd.images.store import Layout

GOOD = "sha256:" + "ab" * 32


@pytest.mark.parametrize("value", [
    "sha256:" + ("/.." * 21)[:64],                # a path, 64 characters long
    "sha256:" + "/etc".ljust(64, "/"),
    "sha256:/etc",
    "sha256:" + "AB" * 32,                        # upper case is not the spec's encoding
    "sha256:" + "ab" * 32 + "\n",
    "sha256:" + "ab" * 31,
    "sha384:" + "ab" * 48,                        # not registered
    "md5:" + "ab" * 16,
    "ab" * 32,
    "",
    None,
    64,
])
def test_malformed_digests_refused(value: object) -> None:
    assert not digest.is_valid(value)
    with pytest.raises(errors.FailedPrecondition, match="invalid digest"):
        digest.check(value, "layers[0]")


def test_sha512_is_well_formed_but_not_stored() -> None:
    value = "sha512:" + "cd" * 64
    assert digest.is_valid(value)
    with pytest.raises(errors.FailedPrecondition, match="unsupported digest algorithm sha512"):
        digest.check(value, "config")


def test_store_paths_only_from_valid_digests(tmp_path: Path) -> None:
    layout = Layout(tmp_path, "overlay")
    assert layout.blob(GOOD) == tmp_path / "blobs" / "sha256" / ("ab" * 32)
    assert layout.snapshot(GOOD).parent == layout.snapshots
    for bad in ("sha256:/etc", "sha256:" + "/etc".ljust(64, "/"), "sha256:" + "../" * 21 + "x"):
        for fn in (layout.blob, layout.snapshot, layout.ingest_file, layout.snapshot_ready):
            with pytest.raises(errors.FailedPrecondition):
                fn(bad)


def test_brief_cuts_long_input() -> None:
    text = digest.brief("x" * 10_000_000)
    assert len(text) < 200 and "10000000 characters" in text
    assert digest.brief("short") == "'short'"
