"""ImageManager in-process: copy snapshotter, in-use refusal, lookups, ENOSPC mapping."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shimd import config, errors
from shimd.images import ImageManager
from shimd.images.manager import chain_ids
from tests.support import images as img
from tests.support.registry import PushedImages, insecure_toml

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")


def make_cfg(extra: str) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(extra))


async def test_copy_snapshotter_merges_layers(tmp_path: Path, test_images: PushedImages) -> None:
    m = ImageManager(make_cfg(insecure_toml(test_images.registry)), tmp_path / "images", snapshot_mode="copy")
    await m.start()
    try:
        image = await m.pull(test_images.layered)
        assert len(image.layers) == 1
        root = Path(image.layers[0])
        assert (root / "bin" / "busybox").is_file() and (root / "data" / "keep").is_file()
        assert not (root / "data" / "gone").exists()
        assert sorted(p.name for p in (root / "opq").iterdir()) == ["c"]
        assert os.stat(root / "bin" / "sh").st_ino == os.stat(root / "bin" / "busybox").st_ino
        assert image.config["config"]["Cmd"] == ["sh"]
    finally:
        await m.close()


async def test_in_use_and_lookups(tmp_path: Path, test_images: PushedImages) -> None:
    m = ImageManager(make_cfg(insecure_toml(test_images.registry)), tmp_path / "images")
    await m.start()
    try:
        image = await m.pull(test_images.busybox)
        man = test_images.manifests["busybox"]
        assert image.id == man.config_digest
        assert image.layers == [str(m.layout.snapshot(c)) for c in reversed(chain_ids([man.layers[0].diff_id]))]
        for ref in (image.id, image.id[7:], test_images.busybox, image.repo_digests[0]):
            assert m.get(ref) is not None and m.get(ref).id == image.id  # type: ignore[union-attr]
        assert m.get("busybox") is None          # docker.io/library/busybox:latest was never pulled
        m.set_in_use_check(lambda image_id: image_id == image.id)
        with pytest.raises(errors.FailedPrecondition, match="in use"):
            await m.remove(test_images.busybox)
        assert m.get(image.id) is not None
        m.set_in_use_check(lambda image_id: False)
        await m.remove(test_images.busybox)
        assert m.get(image.id) is None and m.list() == []
        await m.remove(test_images.busybox)      # idempotent
    finally:
        await m.close()


async def test_tag_moves_to_new_image(tmp_path: Path, test_images: PushedImages) -> None:
    reg = test_images.registry
    c = reg.client()
    one = img.make_image([img.busybox_layer()], cmd=["echo", "one"])
    two = img.make_image([img.busybox_layer()], cmd=["echo", "two"])
    m = ImageManager(make_cfg(insecure_toml(reg)), tmp_path / "images")
    await m.start()
    try:
        ref = c.push_image("moving", "v1", one)
        first = await m.pull(ref)
        c.push_image("moving", "v1", two)
        second = await m.pull(ref)
        assert first.id != second.id
        assert m.get(ref).id == second.id  # type: ignore[union-attr]
        assert m.get(first.id).repo_tags == []  # type: ignore[union-attr]
    finally:
        await m.close()


async def test_enospc_is_resource_exhausted(tmp_path: Path, test_images: PushedImages,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from shimd.images import store

    def full(tmp: Path, final: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "commit_file", full)
    m = ImageManager(make_cfg(insecure_toml(test_images.registry)), tmp_path / "images")
    await m.start()
    try:
        with pytest.raises(errors.ResourceExhausted, match="no space"):
            await m.pull(test_images.busybox)
        assert m.list() == []
    finally:
        await m.close()
