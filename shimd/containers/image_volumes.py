"""Image volumes (CRI Mount.image, kubelet's ImageVolume): an image's filesystem, read-only, in a container.

Each volume is an overlay of the image's layers with no upper directory, so nothing can write to
it, not even a privileged container remounting it: the layers in the image store stay untouched.
It is mounted at <bundle>/volumes/<mount index> when the container is created (the sub path is
checked there), kept while the container may run, and unmounted when the container exits or is
removed. StartContainer mounts it again if it is missing (shimd restarted after a reboot).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from shimd import errors, mounts
from shimd.api.runtime import v1 as cri
from shimd.oci.spec import is_image_mount

VOLUMES_DIR = "volumes"
# An overlay without an upper directory needs two lower ones; a one-layer image gets this empty one.
EMPTY_LOWER = "empty"
# The kernel takes mount options up to a page; beyond this the lowerdirs are given relative to a parent.
OPTIONS_BUDGET = 3500
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class Volume:
    """One image volume of a container, as kept in its record's mounts (keys image_id, image_sub_path)."""

    index: int
    image_id: str
    layers: list[str]
    sub_path: str  # as given; resolved inside the image when mounted


def volumes_root(bundle: Path) -> Path:
    return bundle / VOLUMES_DIR


def mount_point(bundle: Path, index: int) -> Path:
    return volumes_root(bundle) / str(index)


def check_config(config: cri.ContainerConfig) -> None:
    """What can be refused before any image is looked up."""
    for i, m in enumerate(config.mounts):
        if not is_image_mount(m):
            if m.image_sub_path:
                raise errors.InvalidArgument(f"mounts[{i}].image_sub_path is set but mounts[{i}].image is not")
            continue
        if m.host_path:
            raise errors.InvalidArgument(f"mounts[{i}]: host_path and image are mutually exclusive")
        if not m.readonly:
            raise errors.InvalidArgument(f"mounts[{i}].readonly must be true: image volumes are read-only")
        if m.propagation != cri.MountPropagation.PROPAGATION_PRIVATE:
            raise errors.InvalidArgument(f"mounts[{i}].propagation must be PRIVATE for an image volume")
        sub = m.image_sub_path
        if sub and (sub.startswith("/") or ".." in sub.split("/") or "\x00" in sub):
            raise errors.InvalidArgument(f"mounts[{i}].image_sub_path {sub!r} must be a relative path inside "
                                         "the image, without '..'")


def resolve_in_root(root: str, sub: str) -> str:
    """sub resolved inside root as if root were '/': symlinks (absolute or with '..') cannot leave it.
    Returns the resolved path relative to root; raises FileNotFoundError when a component is missing."""
    parts = [p for p in sub.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        path = os.path.join(root, *done, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, f"too many symbolic links in {sub!r}")
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"{'/'.join([*done, name])} is not a directory")
        done.append(name)
    return "/".join(done)


def _overlay_argv(layers: list[str], empty: Path, target: Path) -> list[str]:
    lowers = list(layers) if len(layers) > 1 else [*layers, str(empty)]
    options = "ro,lowerdir=" + ":".join(lowers)
    if len(options) <= OPTIONS_BUDGET:
        return ["mount", "-t", "overlay", "-o", options, "overlay", str(target)]
    # The kernel resolves relative lowerdirs from the mounting process's cwd.
    common = os.path.commonpath(lowers)
    rel = ":".join(os.path.relpath(p, common) for p in lowers)
    return ["env", "-C", common, "mount", "-t", "overlay", "-o", f"ro,lowerdir={rel}", "overlay", str(target)]


def _prepare_sync(bundle: Path, index: int) -> Path:
    target = mount_point(bundle, index)
    target.mkdir(parents=True, exist_ok=True)
    (volumes_root(bundle) / EMPTY_LOWER).mkdir(exist_ok=True)
    return target


async def mount(bundle: Path, vol: Volume, field: str) -> str:
    """Mount the volume if it is not mounted yet; returns the host path to bind (its sub path resolved)."""
    target = await asyncio.to_thread(_prepare_sync, bundle, vol.index)
    if not await asyncio.to_thread(mounts.is_mount_sync, target):
        await mounts.run(*_overlay_argv(vol.layers, volumes_root(bundle) / EMPTY_LOWER, target))
    if not vol.sub_path:
        return str(target)
    try:
        rel = await asyncio.to_thread(resolve_in_root, str(target), vol.sub_path)
    except OSError as e:
        why = "does not exist in the image" if e.errno == errno.ENOENT else (e.strerror or str(e))
        raise errors.NotFound(f"{field}.image_sub_path {vol.sub_path!r} {why}") from None
    return str(target / rel) if rel else str(target)


async def unmount_all(bundle: Path) -> None:
    """Unmount every image volume of a container (none mounted is fine)."""
    await asyncio.to_thread(unmount_all_sync, bundle)


def unmount_all_sync(bundle: Path) -> None:
    root = volumes_root(bundle)
    for name in [p.name for p in root.iterdir()] if root.is_dir() else []:
        if name != EMPTY_LOWER:
            mounts.unmount_sync(root / name)
