"""Hostile registries and images (issue 16 items 1, 2, 4, 5, 6, 9): what they send never reaches the
host, never leaks another pull's credentials, never exhausts the daemon, and a pulled layer is on
disk before the image is visible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.test_images_auth import started
from tests.integration.test_images_errors import assert_store_consistent, expect
from tests.integration.test_images_pull import listed, pull, remove, snapshots
from tests.support import hostile
from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.images import Entry
from tests.support.registry import PASSWORD, USER, Registry, insecure_toml
from tests.support.runtime import Runtime


@pytest.fixture
def raw_registry() -> Iterator[hostile.RawRegistry]:
    reg = hostile.RawRegistry().start()
    yield reg
    reg.stop()


@pytest.fixture
def shimd(tmp_path: Path, raw_registry: hostile.RawRegistry, own_registry: Registry) -> Iterator[ShimdProcess]:
    proc = started(tmp_path, insecure_toml(own_registry, raw_registry.host))
    yield proc
    proc.stop()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A short host directory outside the store (a digest is only 64 characters)."""
    d = Path(tempfile.mkdtemp(prefix="shimd-esc-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_digest(host_path: Path) -> str:
    """A "digest" that is an absolute host path, padded with slashes to 64 characters."""
    text = str(host_path)
    assert len(text) <= 64
    return "sha256:" + text.rjust(64, "/")


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# --- 1. digests used as paths ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["config", "layer", "layer-upper-hex", "config-sha512"])
def test_hostile_digest_in_manifest_never_used(shimd: ShimdProcess, raw_registry: hostile.RawRegistry,
                                               outside: Path, where: str) -> None:
    man = img.busybox_image()
    bad = {"config": as_digest(outside / "cfg"), "layer": as_digest(outside / "lay"),
           "layer-upper-hex": man.layers[0].digest.upper().replace("SHA256", "sha256"),
           "config-sha512": "sha512:" + "ab" * 64}[where]
    if where.startswith("config"):
        raw_registry.add_image("v1", man, config_digest=bad)
    else:
        raw_registry.add_image("v1", man, layer_digests=[bad])
    msg = expect(shimd, f"{raw_registry.host}/evil:v1", grpc.StatusCode.FAILED_PRECONDITION, "digest")
    assert ("unsupported digest algorithm sha512" if where == "config-sha512" else "invalid digest") in msg
    # Refused before anything was fetched or written under that name.
    assert raw_registry.blob_requests() == []
    assert list(outside.iterdir()) == []
    assert listed(shimd) == []


def test_hostile_digest_in_index(shimd: ShimdProcess, raw_registry: hostile.RawRegistry, outside: Path) -> None:
    man = img.busybox_image()
    index = json.loads(img.make_index([man]).body)
    index["manifests"][0]["digest"] = as_digest(outside / "m")
    raw_registry.manifests["v1"] = (img.OCI_INDEX, json.dumps(index).encode())
    expect(shimd, f"{raw_registry.host}/evil:v1", grpc.StatusCode.FAILED_PRECONDITION, "invalid digest")
    assert [p for p in raw_registry.requests if "manifests/v1" not in p and p != "/v2/"] == []


# --- 2. diff_ids used as paths; only the store's own snapshots count ------------------------------


def test_hostile_diff_id_is_not_a_host_directory(shimd: ShimdProcess, own_registry: Registry,
                                                 outside: Path) -> None:
    (outside / "hostfile").write_text("host")
    layer = img.busybox_layer()
    fake = img.Layer(layer.blob, as_digest(outside), layer.media_type)   # real blob, diff_id = host dir
    ref = own_registry.client().push_image("diffid", "v1", img.make_image([fake]))
    expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "rootfs.diff_ids[0]")
    assert listed(shimd) == []


def test_directory_not_created_by_the_store_is_not_a_layer(shimd: ShimdProcess, own_registry: Registry) -> None:
    man = img.busybox_image()
    ref = own_registry.client().push_image("planted", "v1", man)
    # Where the store would put this image's only snapshot (its chain id is its diff id).
    planted = shimd.root / "images" / "snapshots" / "overlay" / man.layers[0].diff_id.removeprefix("sha256:")
    planted.mkdir(parents=True)
    (planted / "planted").write_text("not from the image")
    assert pull(shimd, ref) == man.config_digest
    [snap] = snapshots(shimd, ref)
    assert (snap / "bin" / "busybox").is_file() and not (snap / "planted").exists()
    assert_store_consistent(shimd)


# --- 4. credentials are not reused across pulls ----------------------------------------------------


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_credentials_not_reused_by_a_pull_without_them(tmp_path: Path, kind: str, auth_registry: Registry,
                                                       token_registry: Registry) -> None:
    reg = auth_registry if kind == "basic" else token_registry
    ref = reg.client().push_image("tenant-a", "v1", img.busybox_image())
    proc = started(tmp_path, insecure_toml(reg))
    try:
        assert pull(proc, ref, username=USER, password=PASSWORD)
        remove(proc, ref)
        for auth in ({}, {"username": USER, "password": "wrong"}):
            with pytest.raises(grpc.RpcError) as e:
                pull(proc, ref, **auth)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
            assert "permission denied" in e.value.details() or "authentication" in e.value.details()
        assert listed(proc) == []
        assert pull(proc, ref, username=USER, password=PASSWORD)   # the right credentials still work
    finally:
        proc.stop()


# --- 5. tar header bombs, config size, no unbounded echo -------------------------------------------


@pytest.mark.parametrize("make", [hostile.pax_bomb_layer, hostile.gnu_longname_layer], ids=["pax", "gnu-longname"])
def test_tar_header_bomb_does_not_grow_the_daemon(shimd: ShimdProcess, own_registry: Registry,
                                                  make: object) -> None:
    assert shimd.proc is not None
    bomb = make(256 << 20)  # type: ignore[operator]
    assert len(bomb.blob) < 2 << 20
    ref = own_registry.client().push_image("bomb", "v1", img.make_image([img.busybox_layer(), bomb]))
    before = vm_hwm(shimd.proc.pid)
    msg = expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "extension header")
    grown = vm_hwm(shimd.proc.pid) - before
    assert grown < 64 << 20, f"peak RSS grew by {grown >> 20} MiB unpacking a {len(bomb.blob)} byte layer"
    assert len(msg) < 1024
    assert listed(shimd) == []


def test_long_name_is_not_echoed(shimd: ShimdProcess, own_registry: Registry) -> None:
    ref = own_registry.client().push_image("longname", "v1",
                                           img.make_image([hostile.gnu_longname_layer(1000 << 10)]))
    msg = expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "layer")
    assert len(msg) < 1024, f"{len(msg)} byte error message"
    log_lines = shimd.log_path.read_text(errors="replace").splitlines()
    assert max(len(line) for line in log_lines) < 16 << 10


def test_oversized_image_config_refused_before_download(shimd: ShimdProcess, own_registry: Registry) -> None:
    man = img.make_image([img.busybox_layer()], extra_config={"Labels": {"pad": "x" * (5 << 20)}})
    ref = own_registry.client().push_image("bigcfg", "v1", man)
    expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "image config")
    assert own_registry.blob_gets(man.config_digest) == 0
    assert listed(shimd) == []


# --- 6. /etc/passwd lookups stay in the image ------------------------------------------------------


@pytest.fixture
def host_passwd() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="shimd-hostpw-"))
    (d / "passwd").write_text("hostonly:x:4242:4242::/:/bin/sh\n")
    (d / "group").write_text("hostgroup:x:4343:\n")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _create(rt: Runtime, pod_id: str, pod_cfg: object, image: str, name: str, **sc: object) -> str:
    pb = rt.pb
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
                             command=["sleep", "100"], log_path=f"{name}/0.log",
                             linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**sc)))
    return str(rt.client.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod_cfg)).container_id)


@pytest.mark.parametrize("link", ["file", "dir", "relative-dotdot"])
def test_passwd_symlink_out_of_the_image_is_not_followed(rt: Runtime, host_passwd: Path, link: str) -> None:
    if link == "file":
        entries = [Entry("symlink", "etc/passwd", target=str(host_passwd / "passwd"))]
    elif link == "dir":
        entries = [Entry("symlink", "etc", target=str(host_passwd))]
    else:
        entries = [Entry("symlink", "etc/passwd", target="../" * 20 + str(host_passwd / "passwd").lstrip("/"))]
    if link != "dir":
        entries.insert(0, Entry("dir", "etc", mode=0o755))
    man = img.make_image([img.busybox_layer(), img.make_layer(entries)])
    ref = img.PushClient(rt.image.split("/", 1)[0]).push_image("pwlink", link, man)
    rt.client.images.PullImage(rt.pb.PullImageRequest(image=rt.pb.ImageSpec(image=ref)), timeout=120)
    pod_id, pod_cfg = rt.run_pod(f"pw-{link}")
    with pytest.raises(grpc.RpcError) as e:
        _create(rt, pod_id, pod_cfg, ref, "byname", run_as_username="hostonly")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "not found in the image's /etc/passwd" in e.value.details()


def test_passwd_symlink_inside_the_image_and_size_bound(rt: Runtime) -> None:
    base = img.busybox_layer()
    inside = img.make_layer([Entry("dir", "etc", mode=0o755), Entry("dir", "data", mode=0o755),
                             Entry("file", "data/pw", b"inimage:x:1234:2345::/:/bin/sh\n"),
                             Entry("symlink", "etc/passwd", target="/../data/pw")])
    huge = img.make_layer([Entry("dir", "etc", mode=0o755), Entry("file", "etc/passwd", b"#" * (5 << 20))])
    client = img.PushClient(rt.image.split("/", 1)[0])
    ok_ref = client.push_image("pwinside", "v1", img.make_image([base, inside]))
    huge_ref = client.push_image("pwhuge", "v1", img.make_image([base, huge]))
    for ref in (ok_ref, huge_ref):
        rt.client.images.PullImage(rt.pb.PullImageRequest(image=rt.pb.ImageSpec(image=ref)), timeout=120)
    pod_id, pod_cfg = rt.run_pod("pw-inside")
    cid = _create(rt, pod_id, pod_cfg, ok_ref, "inside", run_as_username="inimage")
    spec = json.loads((rt.proc.state / "containers" / cid / "config.json").read_text())
    assert spec["process"]["user"] == {"uid": 1234, "gid": 2345, "additionalGids": [2345]}
    with pytest.raises(grpc.RpcError) as e:
        _create(rt, pod_id, pod_cfg, huge_ref, "huge")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "/etc/passwd is larger than" in e.value.details()


# --- 9. a snapshot is on disk before it is visible -------------------------------------------------


def _delayed(path: Path) -> bool:
    """True while the file's data has no blocks on disk yet (ext4 delayed allocation: dirty pages)."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    return "delalloc" in out or "unknown_loc" in out


def test_pulled_layers_are_on_disk_when_pull_returns(shimd: ShimdProcess, own_registry: Registry) -> None:
    probe = shimd.base / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    if not _delayed(probe):
        pytest.skip("the store's filesystem does not delay allocation: nothing to observe")
    layer = img.make_layer([Entry("dir", "data", mode=0o755)] +
                           [Entry("file", f"data/f{i}", os.urandom(256 << 10)) for i in range(8)])
    man = img.make_image([img.busybox_layer(), layer])
    ref = own_registry.client().push_image("durable", "v1", man)
    assert pull(shimd, ref) == man.config_digest
    files = [p for snap in snapshots(shimd, ref) for p in snap.rglob("*") if p.is_file() and not p.is_symlink()
             and p.stat().st_size]
    assert len(files) >= 9
    pending = [str(p) for p in files if _delayed(p)]
    assert pending == [], f"pull returned with unwritten snapshot data: {pending[:3]}"


def test_manifest_arriving_in_many_pieces(shimd: ShimdProcess, raw_registry: hostile.RawRegistry) -> None:
    """Bounded reads still read the whole body (aiohttp's read(n) returns what is buffered)."""
    man = img.busybox_image()
    doc = json.loads(man.body)
    doc["annotations"] = {f"pad.{i}": "p" * 1000 for i in range(300)}   # ~300 KB
    raw_registry.manifests["v1"] = (man.media_type, json.dumps(doc).encode())
    raw_registry.blobs[man.config_digest] = man.config
    raw_registry.blobs[man.layers[0].digest] = man.layers[0].blob
    raw_registry.trickle_manifests = True
    assert pull(shimd, f"{raw_registry.host}/trickle:v1") == man.config_digest
