"""PullImage / ListImages / ImageStatus / RemoveImage / ImageFsInfo through a real shimd and registry."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.registry import PushedImages, Registry, insecure_toml


@pytest.fixture(scope="module")
def shimd(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[ShimdProcess]:
    proc = ShimdProcess(Path(tmp_path_factory.mktemp("sdimg")), insecure_toml(registry))
    proc.start()
    yield proc
    proc.stop()


def pull(shimd: ShimdProcess, ref: str, **auth: str) -> str:
    c = shimd.client
    assert c is not None
    req = c.pb.PullImageRequest(image=c.pb.ImageSpec(image=ref))
    if auth:
        req.auth.CopyFrom(c.pb.AuthConfig(**auth))
    return str(c.images.PullImage(req, timeout=120).image_ref)


def status(shimd: ShimdProcess, ref: str, verbose: bool = False) -> Any:
    c = shimd.client
    assert c is not None
    return c.images.ImageStatus(c.pb.ImageStatusRequest(image=c.pb.ImageSpec(image=ref), verbose=verbose),
                                timeout=10)


def listed(shimd: ShimdProcess, ref: str = "") -> list[Any]:
    c = shimd.client
    assert c is not None
    req = c.pb.ListImagesRequest()
    if ref:
        req.filter.image.image = ref
    return list(c.images.ListImages(req, timeout=10).images)


def remove(shimd: ShimdProcess, ref: str) -> None:
    c = shimd.client
    assert c is not None
    c.images.RemoveImage(c.pb.RemoveImageRequest(image=c.pb.ImageSpec(image=ref)), timeout=30)


def snapshots(shimd: ShimdProcess, ref: str) -> list[Path]:
    info = json.loads(status(shimd, ref, verbose=True).info["info"])
    return [Path(p) for p in info["snapshots"]]


def test_pull_busybox_fields(shimd: ShimdProcess, test_images: PushedImages) -> None:
    m = test_images.manifests["busybox"]
    image_id = pull(shimd, test_images.busybox)
    assert image_id == m.config_digest
    st = status(shimd, test_images.busybox).image
    name = test_images.busybox.rsplit(":", 1)[0]
    assert st.id == m.config_digest
    assert list(st.repo_tags) == [test_images.busybox]
    assert list(st.repo_digests) == [f"{name}@{m.digest}"]
    assert st.size == m.size
    assert [i.id for i in listed(shimd, test_images.busybox)] == [image_id]
    assert image_id in [i.id for i in listed(shimd)]
    # Every lookup form kubelet uses finds it.
    for ref in (image_id, image_id.removeprefix("sha256:"), f"{name}@{m.digest}"):
        assert status(shimd, ref).image.id == image_id
    layers = snapshots(shimd, image_id)
    assert len(layers) == 1
    busybox = layers[0] / "bin" / "busybox"
    assert os.stat(layers[0] / "bin" / "sh").st_ino == os.stat(busybox).st_ino
    assert os.stat(layers[0] / "tmp").st_mode & 0o7777 == 0o1777
    assert "app:x:1000" in (layers[0] / "etc" / "passwd").read_text()


def test_pull_docker_schema2(shimd: ShimdProcess, test_images: PushedImages) -> None:
    m = test_images.manifests["busybox_docker"]
    assert pull(shimd, test_images.busybox_docker) == m.config_digest
    st = status(shimd, test_images.busybox_docker).image
    assert st.size == m.size and list(st.repo_tags) == [test_images.busybox_docker]


def test_pull_by_digest(shimd: ShimdProcess, test_images: PushedImages) -> None:
    m = test_images.manifests["busybox_docker"]
    name = test_images.busybox_docker.rsplit(":", 1)[0]
    ref = f"{name}@{m.digest}"
    assert pull(shimd, ref) == m.config_digest
    assert status(shimd, ref).image.id == m.config_digest


def test_layered_whiteouts_and_compressions(shimd: ShimdProcess, test_images: PushedImages) -> None:
    m = test_images.manifests["layered"]
    assert [x.media_type.rsplit(".", 1)[-1] for x in m.layers] == ["tar+gzip", "tar+zstd", "tar"]
    image_id = pull(shimd, test_images.layered)
    assert image_id == m.config_digest
    top, middle, bottom = snapshots(shimd, image_id)
    assert (bottom / "bin" / "busybox").is_file()
    assert sorted(p.name for p in (middle / "opq").iterdir()) == ["a", "b"]
    assert (middle / "data" / "owned").stat().st_uid == 1000
    gone = os.lstat(top / "data" / "gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(top / "opq", "trusted.overlay.opaque") == b"y"
    assert sorted(p.name for p in (top / "opq").iterdir()) == ["c"]
    assert not list(top.rglob(".wh.*"))


def test_multiarch_picks_amd64(shimd: ShimdProcess, test_images: PushedImages) -> None:
    idx = test_images.index
    amd = next(m for m in idx.manifests if m.platform["architecture"] == "amd64")
    image_id = pull(shimd, test_images.multiarch)
    assert image_id == amd.config_digest
    st = status(shimd, test_images.multiarch).image
    name = test_images.multiarch.rsplit(":", 1)[0]
    assert list(st.repo_digests) == [f"{name}@{idx.digest}"]   # the index digest, as containerd reports
    assert (snapshots(shimd, image_id)[0] / "ARCH").read_text() == "amd64\n"


def test_unknown_image_status_is_empty(shimd: ShimdProcess) -> None:
    st = status(shimd, "127.0.0.1:1/nothing:here")
    assert not st.HasField("image")
    assert listed(shimd, "nothing:here") == []


def test_remove_by_tag_id_digest_and_idempotent(shimd: ShimdProcess, registry: Registry) -> None:
    c = registry.client()
    refs = []
    for i in range(3):
        man = img.make_image([img.busybox_layer(), img.make_layer([img.Entry("file", "n", str(i).encode())])])
        refs.append((c.push_image("removable", f"v{i}", man), man))
    for ref, _ in refs:
        pull(shimd, ref)
    name = refs[0][0].rsplit(":", 1)[0]
    forms = [refs[0][0], refs[1][1].config_digest, f"{name}@{refs[2][1].digest}"]
    for (ref, man), form in zip(refs, forms, strict=True):
        layers = snapshots(shimd, ref)
        remove(shimd, form)
        assert not status(shimd, ref).HasField("image")
        assert man.config_digest not in [i.id for i in listed(shimd)]
        assert not layers[0].exists()          # its own top layer went
        assert layers[1].exists()              # the shared busybox layer stays (other images use it)
    remove(shimd, refs[0][0])                  # gone already: still OK
    remove(shimd, "sha256:" + "0" * 64)
    remove(shimd, "127.0.0.1:1/never:pulled")


def test_bad_requests(shimd: ShimdProcess) -> None:
    c = shimd.client
    assert c is not None
    for ref in ("", "UPPER/Case", "busybox@sha256:1234", "a b"):
        with pytest.raises(grpc.RpcError) as e:
            pull(shimd, ref)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ref
        assert "image.image" in e.value.details()


def test_image_fs_info(shimd: ShimdProcess, test_images: PushedImages) -> None:
    pull(shimd, test_images.busybox)
    c = shimd.client
    assert c is not None
    fs = c.images.ImageFsInfo(c.pb.ImageFsInfoRequest(), timeout=30).image_filesystems
    assert len(fs) == 1
    assert fs[0].fs_id.mountpoint == str(shimd.root / "images")
    assert fs[0].used_bytes.value > 1_900_000       # at least busybox itself, once (hard links count once)
    assert fs[0].inodes_used.value > 10


def test_metadata_survives_restart(tmp_path: Path, registry: Registry, test_images: PushedImages) -> None:
    proc = ShimdProcess(tmp_path, insecure_toml(registry))
    try:
        proc.start()
        image_id = pull(proc, test_images.layered)
        before = status(proc, test_images.layered).image
        proc.stop()
        proc.start()
        after = status(proc, test_images.layered).image
        assert after == before and after.id == image_id
        assert all(p.is_dir() for p in snapshots(proc, image_id))
    finally:
        proc.stop()


def test_user_uid_and_stream_images(shimd: ShimdProcess, registry: Registry) -> None:
    c = registry.client()
    by_uid = img.make_image([img.busybox_layer()], extra_config={"User": "1000:1000"})
    by_name = img.make_image([img.busybox_layer()], extra_config={"User": "app"})
    ref_uid, ref_name = c.push_image("users", "uid", by_uid), c.push_image("users", "name", by_name)
    pull(shimd, ref_uid)
    pull(shimd, ref_name)
    st = status(shimd, ref_uid).image
    assert st.HasField("uid") and st.uid.value == 1000 and st.username == ""
    st = status(shimd, ref_name).image
    assert not st.HasField("uid") and st.username == "app"
    cl = shimd.client
    assert cl is not None
    streamed = [i.id for resp in cl.images.StreamImages(cl.pb.StreamImagesRequest(), timeout=10) for i in resp.images]
    assert sorted(streamed) == sorted(i.id for i in listed(shimd))


def test_a_registry_on_the_node_needs_no_configuration(tmp_path: Path, registry: Registry,
                                                        test_images: PushedImages) -> None:
    """Plain HTTP to 127.0.0.1/localhost without a [registries.hosts] entry, as containerd and Docker do;
    an entry of its own (insecure = false here) still decides."""
    assert test_images.busybox.startswith("127.0.0.1:")
    (tmp_path / "a").mkdir()
    proc = ShimdProcess(tmp_path / "a", "")
    try:
        proc.start()
        assert pull(proc, test_images.busybox) == test_images.manifests["busybox"].config_digest
        as_localhost = test_images.busybox_docker.replace("127.0.0.1:", "localhost:", 1)
        assert pull(proc, as_localhost) == test_images.manifests["busybox_docker"].config_digest
    finally:
        proc.stop()
    (tmp_path / "b").mkdir()
    proc = ShimdProcess(tmp_path / "b", f'[registries.hosts."{registry.host}"]\ninsecure = false\n')
    try:
        proc.start()
        with pytest.raises(grpc.RpcError) as e:
            pull(proc, test_images.layered)
        assert f"https://{registry.host}" in (e.value.details() or "")
    finally:
        proc.stop()
