"""On-disk layout of the image store, and its blocking helpers (run them in a thread).

<root>/images/
  blobs/sha256/<hex>        verified content (manifests, configs, compressed layers)
  ingest/<hex>.<rand>       downloads in progress; wiped at start (a restart restarts them)
  snapshots/<mode>/<hex>    one unpacked layer per chain id (mode: overlay or copy)
  snapshots/<mode>/.tmp-*   unpacks in progress; wiped at start
  snapshots/<mode>.committed/<hex>
                            written after its snapshot is synced and renamed into place: only a
                            snapshot with this marker counts as a layer (one without is redone)
  index.json                image metadata, replaced atomically, written last
Everything visible under a final name is complete, because it only gets there by rename.
Every digest is validated before it becomes a file name (digest.hex_of).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from shimd import errors
from shimd.fsutil import fsync_dir
from shimd.images.digest import hex_of


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
        self.committed = root / "snapshots" / f"{mode}.committed"
        self.index = root / "index.json"

    def blob(self, digest: str) -> Path:
        return self.blobs / hex_of(digest, "blob")

    def ingest_file(self, digest: str) -> Path:
        return self.ingest / f"{hex_of(digest, 'blob')}.{uuid.uuid4().hex[:8]}"

    def snapshot(self, chain_id: str) -> Path:
        return self.snapshots / hex_of(chain_id, "chain id")

    def snapshot_tmp(self) -> Path:
        return self.snapshots / f".tmp-{uuid.uuid4().hex}"

    # --- blocking helpers -------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout and drop whatever an interrupted pull left half-done."""
        adopt = not self.committed.exists()
        for d in (self.blobs, self.ingest, self.snapshots, self.committed):
            d.mkdir(parents=True, exist_ok=True)
        if adopt:
            # A store from before commit markers: its snapshots only got their names by rename.
            for p in self.snapshots.iterdir():
                if _is_hex_dir(p):
                    _write_marker(self.committed / p.name)
            fsync_dir(self.committed)
        for p in self.ingest.iterdir():
            _rm(p)
        for p in self.snapshots.iterdir():
            if p.name.startswith(".tmp-") or not (self.committed / p.name).is_file():
                _rm(p)   # unpack in progress, or renamed but never marked: it is redone when needed
        for p in self.committed.iterdir():
            if not _is_hex_dir(self.snapshots / p.name):
                _rm(p)
        for p in self.blobs.iterdir():
            if p.name.startswith("."):
                _rm(p)
        for p in self.root.glob(".probe-*"):   # an overlay probe cut short
            _rm(p)

    def snapshot_ready(self, chain_id: str) -> bool:
        """The store committed this snapshot: a directory that merely exists does not count."""
        hexd = hex_of(chain_id, "chain id")
        try:
            return (stat.S_ISREG(os.lstat(self.committed / hexd).st_mode)
                    and stat.S_ISDIR(os.lstat(self.snapshots / hexd).st_mode))
        except FileNotFoundError:
            return False

    def commit_snapshot(self, tmp: Path, chain_id: str) -> None:
        """Make an unpacked layer durable, then visible under its chain id, then count it (the marker)."""
        final = self.snapshot(chain_id)
        _syncfs(tmp)   # one call flushes every file the unpack wrote (per-file fsync costs far more)
        if final.exists() or final.is_symlink():
            _rm(final)   # a rename that crashed before its marker was written
        os.rename(tmp, final)
        fsync_dir(self.snapshots)
        _write_marker(self.committed / final.name)
        fsync_dir(self.committed)

    def gc(self, live_blobs: set[str], live_chains: set[str]) -> tuple[int, int]:
        """Remove blobs and snapshots nothing references; returns how many of each went."""
        keep_b = {d.partition(":")[2] for d in live_blobs}
        keep_s = {c.partition(":")[2] for c in live_chains}
        nb = ns = 0
        for p in self.blobs.iterdir():
            if p.name not in keep_b:
                _rm(p)
                nb += 1
        for p in self.committed.iterdir():   # unmark first: a crash midway leaves a snapshot to redo
            if p.name not in keep_s:
                _rm(p)
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


def _is_hex_dir(p: Path) -> bool:
    try:
        hex_of(f"sha256:{p.name}", "snapshot")
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except (errors.ShimdError, FileNotFoundError):
        return False


def _write_marker(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path` (os has no wrapper for it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


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
    fsync_dir(final.parent)
