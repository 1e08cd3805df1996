"""Container checkpoint archives in the layout kubelet's checkpoint API and CRI-O produce.

One tar (compressed when `location` ends in .gz/.tgz, .bz2 or .xz; kubelet asks for .tar) holding:

| member | content |
|---|---|
| `config.dump` | JSON: id, name, rootfsImage, rootfsImageRef, rootfsImageName, runtime, createdTime, checkpointedTime |
| `spec.dump` | the container's OCI spec (its bundle's config.json) |
| `checkpoint/` | the CRIU images (`runc checkpoint --image-path`) |
| `rootfs-diff.tar` | the writable layer's files (overlay upper dir, whiteouts left out) |
| `deleted.files` | JSON list of paths the container deleted from its image (the upper dir's whiteouts) |
| `dump.log`, `stats-dump` | CRIU's log and statistics of the dump |

Everything here is blocking file work: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shimd import errors
from shimd.fsutil import fsync_dir

if not hasattr(tarfile, "data_filter"):  # before 3.11.4: the filters come from the backport (pyproject.toml)
    from backports import tarfile  # type: ignore[no-redef]

CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
CHECKPOINT_DIR = "checkpoint"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
DUMP_LOG = "dump.log"
STATS_DUMP = "stats-dump"

_COMPRESSION = ((".tar.gz", "gz"), (".tgz", "gz"), (".tar.bz2", "bz2"), (".tar.xz", "xz"))


def compression(location: str) -> str:
    for suffix, mode in _COMPRESSION:
        if location.endswith(suffix):
            return mode
    return ""


def is_archive_ref(image: str) -> bool:
    """CRI-O's convention: an image that is an absolute path names a checkpoint archive."""
    return image.startswith("/")


def check_location(location: str) -> None:
    parent = os.path.dirname(location)
    if not os.path.isdir(parent):
        raise errors.InvalidArgument(f"location {location!r}: directory {parent!r} does not exist")
    if os.path.isdir(location):
        raise errors.InvalidArgument(f"location {location!r} is a directory; it must name the archive file")


def _rootfs_diff(upper: Path, dest: Path) -> list[str]:
    """Tar of the upper dir without overlay whiteouts; returns the whiteouts as deleted paths."""
    deleted: list[str] = []

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.ischr() and info.devmajor == 0 and info.devminor == 0:
            deleted.append("/" + info.name)
            return None
        return info

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        if upper.is_dir():
            for entry in sorted(os.listdir(upper)):
                tar.add(upper / entry, arcname=entry, recursive=True, filter=keep)
    return deleted


def write_archive(location: str, *, config_dump: dict[str, Any], bundle: Path, images: Path, work: Path,
                  upper: Path) -> None:
    """Builds the archive next to `location` and renames it there, so a partial one is never seen."""
    check_location(location)
    staging = work / "archive"
    staging.mkdir(parents=True, exist_ok=True)
    deleted = _rootfs_diff(upper, staging / ROOTFS_DIFF)
    (staging / CONFIG_DUMP).write_text(json.dumps(config_dump, indent=2))
    shutil.copyfile(bundle / "config.json", staging / SPEC_DUMP)
    if deleted:
        (staging / DELETED_FILES).write_text(json.dumps(deleted))
    tmp = Path(f"{location}.tmp-{secrets.token_hex(4)}")
    try:
        mode = compression(location)
        # 0600: the archive holds the process's memory, secrets included.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb") as f, \
                tarfile.open(fileobj=f, mode=f"w:{mode}" if mode else "w", format=tarfile.PAX_FORMAT) as tar:
            for name in (CONFIG_DUMP, SPEC_DUMP, DELETED_FILES, ROOTFS_DIFF):
                if (staging / name).exists():
                    tar.add(staging / name, arcname=name)
            tar.add(images, arcname=CHECKPOINT_DIR, recursive=True)
            # CRIU writes its log to the work dir and its statistics to the image dir; CRI-O lifts both.
            for name, src in ((DUMP_LOG, work / DUMP_LOG), (STATS_DUMP, images / STATS_DUMP)):
                if src.is_file():
                    tar.add(src, arcname=name)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, location)
        fsync_dir(os.path.dirname(location))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass
class Unpacked:
    """What CreateContainer needs from an archive unpacked into `directory`."""

    directory: Path
    config: dict[str, Any]
    spec: dict[str, Any]

    @property
    def images(self) -> Path:
        return self.directory / CHECKPOINT_DIR

    def image_refs(self) -> list[str]:
        return image_refs(self.config)


def image_refs(config_dump: dict[str, Any]) -> list[str]:
    """The checkpointed container's image, most precise first (id, then the names it was created by)."""
    return [str(config_dump[k]) for k in ("rootfsImageRef", "rootfsImageName", "rootfsImage") if config_dump.get(k)]


def _json_member(tar: tarfile.TarFile, name: str, field: str) -> dict[str, Any]:
    f = tar.extractfile(name)
    if f is None:
        raise errors.InvalidArgument(f"{field}: {name} is not a regular file")
    try:
        value = json.loads(f.read(16 << 20))
    except ValueError as e:
        raise errors.InvalidArgument(f"{field}: {name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{field}: {name} must be a JSON object")
    return value


def _archive_field(archive: Path) -> str:
    """How errors about `archive` name it; NOT_FOUND when there is no such file."""
    field = f"config.image.image {str(archive)!r}"
    if not archive.is_file():
        raise errors.NotFound(f"{field}: no such checkpoint archive")
    return field


def _dump_names(tar: tarfile.TarFile, field: str) -> set[str]:
    """The archive's member names; INVALID_ARGUMENT unless it has both dumps of a container checkpoint."""
    names = set(tar.getnames())
    if CONFIG_DUMP not in names or SPEC_DUMP not in names:
        raise errors.InvalidArgument(f"{field} is not a container checkpoint archive: it has no "
                                     f"{CONFIG_DUMP} and {SPEC_DUMP}")
    return names


def read_metadata(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.dump and spec.dump of an archive, read without unpacking it; INVALID_ARGUMENT (naming
    config.image.image) for anything that is not a container checkpoint."""
    field = _archive_field(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            names = _dump_names(tar, field)
            if f"{CHECKPOINT_DIR}/inventory.img" not in names:
                raise errors.InvalidArgument(f"{field} has no CRIU images ({CHECKPOINT_DIR}/inventory.img)")
            return _json_member(tar, CONFIG_DUMP, field), _json_member(tar, SPEC_DUMP, field)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise errors.InvalidArgument(f"{field} is not a readable checkpoint archive: {e}") from None


def unpack_into(archive: Path, dest: Path, upper: Path) -> Unpacked:
    """The whole archive into dest (CRIU images for the restore), its writable layer into upper."""
    unpacked = unpack(archive, dest)
    apply_rootfs_diff(unpacked, upper)
    return unpacked


def unpack(archive: Path, dest: Path) -> Unpacked:
    """Extracts a checkpoint archive; INVALID_ARGUMENT (naming config.image.image) for anything that is not one."""
    field = _archive_field(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            _dump_names(tar, field)
            dest.mkdir(parents=True, exist_ok=True)
            # The data filter refuses absolute names, '..', links out of dest and device files.
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError) as e:
        raise errors.InvalidArgument(f"{field} is not a readable checkpoint archive: {e}") from None
    try:
        config = json.loads((dest / CONFIG_DUMP).read_bytes())
        spec = json.loads((dest / SPEC_DUMP).read_bytes())
    except ValueError as e:
        raise errors.InvalidArgument(f"{field}: {CONFIG_DUMP} or {SPEC_DUMP} is not JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(spec, dict):
        raise errors.InvalidArgument(f"{field}: {CONFIG_DUMP} and {SPEC_DUMP} must be JSON objects")
    if not (dest / CHECKPOINT_DIR / "inventory.img").is_file():
        raise errors.InvalidArgument(f"{field} has no CRIU images ({CHECKPOINT_DIR}/inventory.img)")
    return Unpacked(dest, config, spec)


def _diff_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """Names must stay inside the layer (tar_filter strips leading slashes and refuses escapes), but
    modes, owners and device files are the container's own and are kept as they were."""
    return tarfile.tar_filter(member, path).replace(mode=member.mode, deep=False)


def apply_rootfs_diff(unpacked: Unpacked, upper: Path) -> None:
    """Lays the checkpointed writable layer into a new container's (still unmounted) upper dir."""
    diff = unpacked.directory / ROOTFS_DIFF
    if diff.is_file():
        try:
            with tarfile.open(diff, "r") as tar:
                tar.extractall(upper, filter=_diff_filter)
        except (tarfile.TarError, EOFError) as e:
            raise errors.InvalidArgument(f"config.image.image: {ROOTFS_DIFF} of the checkpoint archive cannot "
                                         f"be applied: {e}") from None
        diff.unlink()
    deleted_path = unpacked.directory / DELETED_FILES
    if not deleted_path.is_file():
        return
    try:
        deleted = json.loads(deleted_path.read_bytes())
    except ValueError as e:
        raise errors.InvalidArgument(f"config.image.image: {DELETED_FILES} is not JSON: {e}") from None
    root = os.path.realpath(upper)
    for name in deleted if isinstance(deleted, list) else []:
        target = os.path.realpath(os.path.join(upper, str(name).lstrip("/")))
        if not target.startswith(root + "/"):
            raise errors.InvalidArgument(f"config.image.image: {DELETED_FILES} entry {name!r} leaves the rootfs")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        # An overlay whiteout: a 0/0 character device hides the lower layer's file.
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
