"""Bytes and inodes used by a container's writable layer (its overlay upper directory)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    bytes: int
    inodes: int


def usage(path: str) -> Usage | None:
    """Like `du`: allocated blocks, each inode counted once (hard links), symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        st = os.lstat(path)
    except OSError:
        return None
    seen.add((st.st_dev, st.st_ino))
    total += st.st_blocks * 512
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue  # removed while walking
        with it:
            for entry in it:
                try:
                    est = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (est.st_dev, est.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                total += est.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(total, len(seen))
