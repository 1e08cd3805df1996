"""On-disk layout of the image store, and its blocking helpers (run them in a thread).

<root>/images/
  blobs/sha256/<hex>        verified content (manifests, configs, compressed layers)
  ingest/<hex>.<rand>       downloads in progress; wiped at start (a restart restarts them)
  snapshots/<mode>/<hex>    one unpacked layer per chain id (mode: overlay or copy)
  snapshots/<mode>/.tmp-*   unpacks in progress; wiped at start
  index.json                image metadata, replaced atomically, written last
Everything visible under a final name is complete, because it only gets there by rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from shimd import errors


@dataclass
class FsUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int


class Layout:
    def __init__(self, root: Path, mode: str) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest = root / "ingest"
        self.snapshots = root / "snapshots" / mode
        self.index = root / "index.json"

    def blob(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            raise errors.InvalidArgument(f"unsupported digest {digest!r}")
        return self.blobs / hexd

    def ingest_file(self, digest: str) -> Path:
        return self.ingest / f"{digest.partition(':')[2]}.{uuid.uuid4().hex[:8]}"

    def snapshot(self, chain_id: str) -> Path:
        return self.snapshots / chain_id.partition(":")[2]

    def snapshot_tmp(self) -> Path:
        return self.snapshots / f".tmp-{uuid.uuid4().hex}"

    # --- blocking helpers -------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout and drop whatever an interrupted pull left half-done."""
        for d in (self.blobs, self.ingest, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)
        for p in self.ingest.iterdir():
            _rm(p)
        for p in self.snapshots.iterdir():
            if p.name.startswith(".tmp-"):
                _rm(p)
        for p in self.blobs.iterdir():
            if p.name.startswith("."):
                _rm(p)
        for p in self.root.glob(".probe-*"):   # an overlay probe cut short
            _rm(p)

    def gc(self, live_blobs: set[str], live_chains: set[str]) -> tuple[int, int]:
        """Remove blobs and snapshots nothing references; returns how many of each went."""
        keep_b = {d.partition(":")[2] for d in live_blobs}
        keep_s = {c.partition(":")[2] for c in live_chains}
        nb = ns = 0
        for p in self.blobs.iterdir():
            if p.name not in keep_b:
                _rm(p)
                nb += 1
        for p in self.snapshots.iterdir():
            if not p.name.startswith(".tmp-") and p.name not in keep_s:
                _rm(p)
                ns += 1
        return nb, ns

    def usage(self) -> FsUsage:
        """Real bytes (allocated blocks) and inodes under the store, hard links counted once."""
        seen: set[tuple[int, int]] = set()
        used = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in (*dirnames, *filenames):
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(os.path.join(dirpath, name))
                    key = (st.st_dev, st.st_ino)
                    if key not in seen:
                        seen.add(key)
                        used += st.st_blocks * 512
        return FsUsage(str(self.root), used, len(seen))


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def read_verified(path: Path, digest: str) -> bytes:
    """Read a small blob (manifest, config) and check it still matches its digest."""
    data = path.read_bytes()
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise errors.FailedPrecondition(f"stored blob {digest} is corrupted")
    return data


def commit_file(tmp: Path, final: Path) -> None:
    """fsync and rename into place; the directory entry is fsynced too so the blob survives a crash."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
