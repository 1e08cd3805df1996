"""Layer unpacking: whiteouts in both snapshot forms, metadata, and refusal of unsafe entries."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from shimd.images.unpack import LayerError, apply_layer
from tests.support import hostile
from tests.support import images as img
from tests.support.images import Entry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted xattrs)")


def write_layer(tmp: Path, entries: list[Entry], how: str = "gzip") -> tuple[Path, str, str]:
    layer = img.make_layer(entries, how)
    blob = tmp / f"blob-{layer.digest[7:19]}"
    blob.write_bytes(layer.blob)
    return blob, layer.media_type, layer.diff_id


LOWER = [Entry("dir", "d", mode=0o755), Entry("file", "d/keep", b"k"), Entry("file", "d/gone", b"g"),
         Entry("dir", "o", mode=0o755), Entry("file", "o/old", b"o")]
UPPER = [Entry("dir", "d", mode=0o755), Entry("file", "d/.wh.gone"), Entry("dir", "o", mode=0o755),
         Entry("file", "o/new", b"n"), Entry("file", "o/.wh..wh..opq")]


@pytest.mark.parametrize("how", ["gzip", "zstd", "none"])
def test_overlay_form(tmp_path: Path, how: str) -> None:
    blob, mt, diff = write_layer(tmp_path, UPPER, how)
    dest = tmp_path / "snap"
    dest.mkdir()
    apply_layer(blob, mt, dest, overlay=True, diff_id=diff)
    st = os.lstat(dest / "d/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "o", "trusted.overlay.opaque") == b"y"
    assert (dest / "o/new").read_bytes() == b"n"   # same-layer entries survive the opaque marker
    assert not list(dest.rglob(".wh.*"))


def test_copy_form(tmp_path: Path) -> None:
    dest = tmp_path / "snap"
    dest.mkdir()
    for entries in (LOWER, UPPER):
        blob, mt, diff = write_layer(tmp_path, entries)
        apply_layer(blob, mt, dest, overlay=False, diff_id=diff)
    assert (dest / "d/keep").exists() and not (dest / "d/gone").exists()
    assert sorted(p.name for p in (dest / "o").iterdir()) == ["new"]
    assert not list(dest.rglob(".wh.*"))


def test_metadata_and_links(tmp_path: Path) -> None:
    entries = [
        Entry("dir", "bin", mode=0o755),
        Entry("file", "bin/tool", b"x" * 10, mode=0o4755),
        Entry("hardlink", "bin/alias", target="bin/tool"),
        Entry("symlink", "bin/abs", target="/bin/tool"),
        Entry("file", "owned", b"o", mode=0o640, uid=1000, gid=1001, xattrs={"user.note": "hi"}),
        Entry("dir", "tmp", mode=0o1777),
        Entry("chardev", "null", mode=0o666),
    ]
    blob, mt, diff = write_layer(tmp_path, entries)
    dest = tmp_path / "snap"
    dest.mkdir()
    apply_layer(blob, mt, dest, overlay=True, diff_id=diff)
    assert os.stat(dest / "bin/tool").st_mode & 0o7777 == 0o4755
    assert os.stat(dest / "bin/alias").st_ino == os.stat(dest / "bin/tool").st_ino
    assert os.readlink(dest / "bin/abs") == "/bin/tool"
    st = os.stat(dest / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1001, 0o640)
    assert os.getxattr(dest / "owned", "user.note") == b"hi"
    assert os.stat(dest / "tmp").st_mode & 0o7777 == 0o1777
    assert stat.S_ISCHR(os.lstat(dest / "null").st_mode)


@pytest.mark.parametrize("entries", [
    [Entry("file", "../evil", b"x")],
    [Entry("file", "a/../../evil", b"x")],
    [Entry("file", "/abs-evil", b"x")],
    [Entry("hardlink", "h", target="../outside/target")],
], ids=["dotdot", "nested-dotdot", "absolute", "hardlink-escape"])
def test_escaping_paths_refused(tmp_path: Path, entries: list[Entry]) -> None:
    blob, mt, diff = write_layer(tmp_path, entries)
    dest = tmp_path / "a" / "snap"
    dest.mkdir(parents=True)
    with pytest.raises(LayerError):
        apply_layer(blob, mt, dest, overlay=True, diff_id=diff)
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()


def test_write_through_symlink_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    blob, mt, diff = write_layer(tmp_path, [Entry("symlink", "esc", target=str(outside)),
                                            Entry("file", "esc/pwned", b"x")])
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(LayerError, match="symlink"):
        apply_layer(blob, mt, dest, overlay=False, diff_id=diff)
    assert list(outside.iterdir()) == []


def test_overlay_xattrs_from_layer_ignored(tmp_path: Path) -> None:
    blob, mt, diff = write_layer(tmp_path, [Entry("dir", "d", mode=0o755,
                                                  xattrs={"trusted.overlay.opaque": "y"})])
    dest = tmp_path / "snap"
    dest.mkdir()
    apply_layer(blob, mt, dest, overlay=True, diff_id=diff)
    with pytest.raises(OSError):
        os.getxattr(dest / "d", "trusted.overlay.opaque")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    blob, mt, _ = write_layer(tmp_path, [Entry("file", "f", b"x")])
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(LayerError, match="corrupted"):
        apply_layer(blob, mt, dest, overlay=True, diff_id="sha256:" + "0" * 64)


def test_truncated_archive(tmp_path: Path) -> None:
    blob, mt, diff = write_layer(tmp_path, [Entry("file", "f", os.urandom(100_000))])
    blob.write_bytes(blob.read_bytes()[:5000])
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(LayerError, match="corrupt"):
        apply_layer(blob, mt, dest, overlay=True, diff_id=diff)


def test_multi_member_gzip_and_big_sparse_file(tmp_path: Path) -> None:
    import gzip

    raw = img.tar_bytes([Entry("file", "zeros", b"\0" * (8 << 20)), Entry("file", "tail", b"t")])
    half = len(raw) // 2
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))   # two members, as pigz may write
    dest = tmp_path / "snap"
    dest.mkdir()
    apply_layer(blob, img.LAYER_TYPES[("oci", "gzip")], dest, overlay=True, diff_id=img.sha256(raw))
    assert (dest / "zeros").stat().st_size == 8 << 20 and (dest / "tail").read_bytes() == b"t"


# --- hostile headers (issue 16 item 5) ----------------------------------------------------------

def _apply_bounded(tmp_path: Path, layer: img.Layer) -> tuple[str, int]:
    """Apply a hostile layer; (error message, peak bytes Python allocated while doing it)."""
    import tracemalloc

    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob)
    dest = tmp_path / "snap"
    dest.mkdir()
    tracemalloc.start()
    try:
        with pytest.raises(LayerError) as e:
            apply_layer(blob, layer.media_type, dest, overlay=True, diff_id=layer.diff_id)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(e.value), peak


@pytest.mark.parametrize("make", [hostile.pax_bomb_layer, hostile.gnu_longname_layer], ids=["pax", "gnu-longname"])
def test_huge_extension_header_refused_without_reading_it(tmp_path: Path, make: object) -> None:
    layer = make(64 << 20)  # type: ignore[operator]
    msg, peak = _apply_bounded(tmp_path, layer)
    assert "extension header" in msg and len(msg) < 300, msg
    assert peak < 16 << 20, f"unpacking allocated {peak} bytes for a header it should refuse"


def test_long_name_within_header_bound_is_refused_and_not_echoed(tmp_path: Path) -> None:
    msg, _ = _apply_bounded(tmp_path, hostile.gnu_longname_layer(900 << 10))
    assert "longer than 4096" in msg and len(msg) < 300, msg


def test_chained_extension_headers_bounded(tmp_path: Path) -> None:
    # Nine PAX headers in a row: tarfile would recurse through each while holding the previous ones.
    buf = io.BytesIO()
    for _ in range(9):
        ti = tarfile.TarInfo("././@PaxHeader")
        record = b"16 comment=abcd\n"
        ti.type, ti.size = tarfile.XHDTYPE, len(record)
        buf.write(ti.tobuf(format=tarfile.GNU_FORMAT) + record + b"\0" * (512 - len(record)))
    buf.write(tarfile.TarInfo("f").tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    raw = buf.getvalue()
    layer = img.Layer(raw, img.sha256(raw), img.LAYER_TYPES[("oci", "none")])
    msg, _ = _apply_bounded(tmp_path, layer)
    assert "extension headers" in msg


def test_error_from_the_filesystem_does_not_echo_the_name(tmp_path: Path) -> None:
    # 300 characters: fine for tar and PATH_MAX, too long for one file name (ENAMETOOLONG).
    blob, mt, diff = write_layer(tmp_path, [Entry("file", "x" * 300, b"x")])
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(LayerError) as e:
        apply_layer(blob, mt, dest, overlay=True, diff_id=diff)
    assert "File name too long" in str(e.value) and len(str(e.value)) < 300, str(e.value)
