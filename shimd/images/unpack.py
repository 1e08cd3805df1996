"""Applies one layer tarball to a directory. Blocking: callers run it in a worker thread.

Two forms:
- overlay: the directory holds this layer alone, as an overlayfs lower dir. OCI whiteouts become
  overlay's own: `.wh.NAME` -> 0/0 character device NAME, `.wh..wh..opq` -> trusted.overlay.opaque=y.
- copy: the directory already holds the merged lower layers; whiteouts delete from it.

Nothing is ever written outside `dest`: absolute names and `..` are refused, and no path component
may be a symlink (a layer could otherwise plant `x -> /etc` and then write `x/passwd`).

tarfile reads a PAX or GNU long-name header whole into memory, and chains of them recursively: a
small compressed layer could declare gigabytes. Header sizes, chains and sparse maps are bounded
(Go's archive/tar, which containerd uses, allows 1 MiB per header), and no entry name reaches an
error message uncut.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

import zstandard

from shimd import errors
from shimd.images.digest import brief
from shimd.images.follow import FollowReader

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
MAX_HEADER = 1 << 20          # one PAX / GNU long name / long link header
MAX_EXTENSIONS = 8            # extension headers before one entry (each held until the entry is read)
MAX_GLOBAL_PAX = 1 << 20      # all global PAX records together (they accumulate over the archive)
MAX_SPARSE_ENTRIES = 1 << 16  # (offset, size) pairs of one sparse file
MAX_PATH = 4096               # PATH_MAX: a longer name cannot be created anyway
# What a bad entry (not the host) causes; anything else keeps its errno (ENOSPC, EIO...).
_ENTRY_ERRNOS = {errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EINVAL,
                 errno.ELOOP, errno.EMLINK, errno.ENOENT, errno.EXDEV}
_EXTENSION_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)


class LayerError(errors.FailedPrecondition):
    """The layer's content is unusable (corrupt archive or an unsafe entry)."""


class _HashingReader:
    """Hashes the uncompressed stream as tarfile reads it, so the diff id is checked in the same pass."""

    def __init__(self, raw: IO[bytes] | Any) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _Gunzip:
    """Multi-member gzip decoder with large reads; zlib checks each member's CRC and length itself.

    (gzip.GzipFile decodes in 8 KiB steps and adds a second CRC pass: about twice the CPU.)
    """

    def __init__(self, raw: IO[bytes] | FollowReader) -> None:
        self.raw = raw
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pending = b""      # compressed input not yet given to zlib
        self.started = False

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n < 0 else max(1, min(n, 4 * CHUNK))
        while True:
            if self.d.eof:
                rest = self.d.unused_data + self.pending
                self.pending = b""
                if not rest:
                    rest = self.raw.read(CHUNK)
                if not rest:
                    return b""
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next member
                self.pending = rest
            data = self.d.unconsumed_tail or self.pending
            if not data:
                data = self.raw.read(CHUNK)
                if not data:
                    if self.started and not self.d.eof:
                        raise EOFError("gzip stream ends before the end of its last member")
                    return b""
            self.pending = b""
            self.started = True
            out = self.d.decompress(data, want)
            if out:
                return out


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile.TarInfo with bounds on what a header may make tarfile hold in memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENSION_TYPES:
            return super()._proc_member(tarfile_)
        # tarfile recurses into the next header while holding this one: bound the chain, and what
        # it holds in all, as one header.
        depth, held = getattr(tarfile_, "_shimd_chain", (0, 0))
        if self.size > MAX_HEADER or held + self.size > MAX_HEADER:
            raise LayerError(f"tar extension header of {self.size} bytes (at most {MAX_HEADER} allowed "
                             "for one entry)")
        if depth >= MAX_EXTENSIONS:
            raise LayerError(f"more than {MAX_EXTENSIONS} tar extension headers before one entry")
        tarfile_._shimd_chain = (depth + 1, held + self.size)
        try:
            member = super()._proc_member(tarfile_)
        finally:
            tarfile_._shimd_chain = (depth, held)
        if self.type == tarfile.XGLTYPE and sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items()) > \
                MAX_GLOBAL_PAX:
            raise LayerError(f"global PAX headers larger than {MAX_GLOBAL_PAX} bytes")
        if len(member.name) > MAX_PATH or len(member.linkname) > MAX_PATH:
            raise LayerError(f"entry name {brief(member.name)} or link target longer than {MAX_PATH}")
        return member

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # Old GNU sparse: extension blocks follow while the "extended" flag is set.
        structs, extended, realsize = self._sparse_structs
        del self._sparse_structs
        blocks = 0
        while extended:
            blocks += 1
            if blocks * tarfile.BLOCKSIZE > MAX_HEADER:
                raise LayerError(f"sparse map of {brief(self.name)} longer than {MAX_HEADER} bytes")
            buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError("unexpected end of data in a sparse header")
            for i in range(21):
                field = buf[i * 24:(i + 1) * 24]
                try:
                    offset, size = tarfile.nti(field[:12]), tarfile.nti(field[12:])
                except ValueError:
                    break
                if offset and size:
                    structs.append((offset, size))
            extended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)
        self.size = realsize
        return self

    def _proc_gnusparse_10(self, next_: tarfile.TarInfo, pax_headers: dict[str, str],
                           tarfile_: tarfile.TarFile) -> None:
        # PAX sparse 1.0: the map is decimal lines at the start of the data, count first.
        buf = b""
        read = 0

        def line() -> int:
            nonlocal buf, read
            while b"\n" not in buf:
                if read >= MAX_HEADER:
                    raise LayerError(f"sparse map longer than {MAX_HEADER} bytes")
                block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
                if len(block) != tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("unexpected end of data in a sparse map")
                buf += block
                read += len(block)
            text, buf = buf.split(b"\n", 1)
            if not text.isdigit() or len(text) > 20:
                raise tarfile.ReadError("malformed sparse map")
            return int(text)

        count = line()
        if count > MAX_SPARSE_ENTRIES:
            raise LayerError(f"sparse map of {count} entries (at most {MAX_SPARSE_ENTRIES})")
        numbers = [line() for _ in range(2 * count)]
        next_.offset_data = tarfile_.fileobj.tell()
        next_.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))


def _decompressed(f: IO[bytes] | FollowReader, media_type: str) -> IO[bytes] | Any:
    if media_type.endswith(("gzip", "+gzip")):
        return _Gunzip(f)
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return zstandard.ZstdDecompressor().stream_reader(f, read_size=CHUNK, read_across_frames=True)
    if media_type.endswith((".tar", "layer.v1.tar")):
        return f
    raise LayerError(f"unsupported layer media type {brief(media_type)}")


def _components(name: str, what: str) -> list[str]:
    if len(name) > MAX_PATH:
        raise LayerError(f"{what} {brief(name)} is longer than {MAX_PATH}")
    if name.startswith("/"):
        raise LayerError(f"{what} {brief(name)} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {brief(name)} escapes the layer root")
    return parts


class _Extractor:
    def __init__(self, dest: Path, overlay: bool) -> None:
        self.dest = str(dest)
        self.overlay = overlay
        self.seen: set[str] = set()          # paths written by this layer (copy mode opaque dirs keep them)
        self.dir_times: list[tuple[str, float]] = []

    def _dir(self, parts: list[str], create: bool) -> str:
        """Walk to a directory inside dest, refusing symlinks and (optionally) creating what is missing."""
        path = self.dest
        for p in parts:
            path = os.path.join(path, p)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise LayerError(f"link target {brief('/'.join(parts))} does not exist") from None
                os.mkdir(path, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise LayerError(f"entry path {brief('/'.join(parts))} goes through symlink {brief(p)}")
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"entry path {brief('/'.join(parts))}: {brief(p)} is not a directory")
        return path

    @staticmethod
    def _remove(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def run(self, tf: tarfile.TarFile) -> None:
        for m in tf:
            parts = _components(m.name, "entry")
            if not parts:
                continue  # the root itself
            try:
                self._member(tf, m, parts)
            except OSError as e:
                # The OSError's own text repeats the (layer-chosen) path: report it cut short.
                if e.errno in _ENTRY_ERRNOS:
                    raise LayerError(f"entry {brief(m.name)}: {e.strerror}") from None
                raise OSError(e.errno, f"{e.strerror} unpacking entry {brief(m.name)}") from None
        self.finish()

    def _member(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str]) -> None:
        parent = self._dir(parts[:-1], create=True)
        base = parts[-1]
        if base == OPAQUE:
            self._opaque(parent)
        elif base.startswith(WHITEOUT):
            if not base.startswith(WHITEOUT + WHITEOUT):   # other .wh..wh.* are aufs bookkeeping
                self._whiteout(parent, base[len(WHITEOUT):])
        else:
            self._entry(tf, m, os.path.join(parent, base))

    def finish(self) -> None:
        for path, mtime in reversed(self.dir_times):
            with contextlib.suppress(OSError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)

    def _opaque(self, parent: str) -> None:
        if self.overlay:
            os.setxattr(parent, "trusted.overlay.opaque", b"y")
            return
        for child in os.listdir(parent):
            path = os.path.join(parent, child)
            if path not in self.seen:
                self._remove(path)

    def _whiteout(self, parent: str, name: str) -> None:
        if not name or name in (".", "..") or "/" in name:
            raise LayerError(f"bad whiteout name {brief(name)}")
        path = os.path.join(parent, name)
        self._remove(path)
        if self.overlay:
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            self.seen.add(path)

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        if m.isdir():
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    self._remove(path)
                    os.mkdir(path, 0o755)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
        else:
            self._remove(path)
            if m.isreg():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with open(fd, "wb") as out:
                    src = tf.extractfile(m)
                    if src is not None:
                        shutil.copyfileobj(src, out, CHUNK)
            elif m.issym():
                os.symlink(m.linkname, path)
            elif m.islnk():
                tparts = _components(m.linkname, "hard link target")
                if not tparts:
                    raise LayerError(f"hard link {brief(m.name)} to the layer root")
                target = os.path.join(self._dir(tparts[:-1], create=False), tparts[-1])
                os.link(target, path, follow_symlinks=False)
                self.seen.add(path)
                return  # shares the target's inode and metadata
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(path, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(path, m.mode & 0o7777)
            else:
                raise LayerError(f"entry {brief(m.name)} has unsupported type {m.type!r}")
        self.seen.add(path)
        self._metadata(m, path)

    def _metadata(self, m: tarfile.TarInfo, path: str) -> None:
        os.lchown(path, m.uid, m.gid)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            if attr.startswith("trusted.overlay."):
                continue  # only our own whiteout conversion may set overlay's attributes
            try:
                os.setxattr(path, attr, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        if m.isdir():
            self.dir_times.append((path, m.mtime))
        else:
            with contextlib.suppress(OSError):
                os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def apply_layer(blob: Path | FollowReader, media_type: str, dest: Path, overlay: bool, diff_id: str) -> None:
    """Extract `blob` (a stored file, or one still downloading) into `dest`, checking the uncompressed
    stream against `diff_id`."""
    try:
        with open(blob, "rb") if isinstance(blob, Path) else blob as f:
            reader = _HashingReader(_decompressed(f, media_type))
            with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK,  # type: ignore[call-overload]
                              tarinfo=_BoundedTarInfo) as tf:
                _Extractor(dest, overlay).run(tf)
            reader.drain()
    except LayerError as e:
        raise LayerError(f"layer {diff_id}: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise LayerError(f"layer {diff_id}: corrupt archive: {brief(str(e), 200)}") from e
    got = "sha256:" + reader.hash.hexdigest()
    if got != diff_id:
        raise LayerError(f"layer {diff_id}: uncompressed content has digest {got} (corrupted)")
