"""Failing pulls: each gives the right status and leaves the store consistent."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration.test_images_pull import listed, pull
from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.images import Entry
from tests.support.registry import Registry, free_port, insecure_toml


@pytest.fixture
def shimd(tmp_path: Path, own_registry: Registry, registry: Registry) -> Iterator[ShimdProcess]:
    base = tmp_path / "sd"
    base.mkdir()
    proc = ShimdProcess(base, insecure_toml(own_registry, registry))
    proc.start()
    yield proc
    proc.stop()


def assert_store_consistent(proc: ShimdProcess) -> None:
    root = proc.root / "images"
    assert list((root / "ingest").iterdir()) == []
    snaps = root / "snapshots" / "overlay"
    assert [p for p in snaps.iterdir() if p.name.startswith(".tmp")] == []
    for blob in (root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"bad blob {blob}"
    index = json.loads((root / "index.json").read_text()) if (root / "index.json").exists() else {"images": []}
    assert sorted(i["id"] for i in index["images"]) == sorted(i.id for i in listed(proc))
    for rec in index["images"]:
        assert all((snaps / c.removeprefix("sha256:")).is_dir() for c in rec["chain_ids"])


def expect(proc: ShimdProcess, ref: str, code: grpc.StatusCode, text: str = "") -> str:
    with pytest.raises(grpc.RpcError) as e:
        pull(proc, ref)
    assert e.value.code() == code, e.value.details()
    assert text in e.value.details()
    assert_store_consistent(proc)
    return str(e.value.details())


def test_unknown_registry(shimd: ShimdProcess) -> None:
    port = free_port()   # nothing listens there: connection refused
    expect(shimd, f"127.0.0.1:{port}/app:v1", grpc.StatusCode.NOT_FOUND, "unreachable")


def test_unknown_tag_and_repo(shimd: ShimdProcess, own_registry: Registry) -> None:
    img_ref = own_registry.client().push_image("present", "v1", img.busybox_image())
    expect(shimd, img_ref.replace(":v1", ":v2"), grpc.StatusCode.NOT_FOUND)
    expect(shimd, f"{own_registry.host}/absent:v1", grpc.StatusCode.NOT_FOUND)


def test_corrupt_blob(shimd: ShimdProcess, own_registry: Registry) -> None:
    man = img.make_image([img.busybox_layer(), img.make_layer([Entry("file", "x", b"x" * 5000)])])
    ref = own_registry.client().push_image("corrupt", "v1", man)
    path = own_registry.blob_path(man.layers[1].digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                   # same size, wrong digest
    path.write_bytes(bytes(data))
    expect(shimd, ref, grpc.StatusCode.UNAVAILABLE, "corrupted")
    assert listed(shimd) == []


def test_truncated_layer(shimd: ShimdProcess, own_registry: Registry) -> None:
    man = img.make_image([img.make_layer([Entry("file", "x", bytes(range(256)) * 400)])])
    ref = own_registry.client().push_image("truncated", "v1", man)
    path = own_registry.blob_path(man.layers[0].digest)
    path.write_bytes(path.read_bytes()[:1000])
    expect(shimd, ref, grpc.StatusCode.UNAVAILABLE, "truncated")


@pytest.mark.parametrize("entries", [
    [Entry("file", "../../../../escaped-by-layer", b"x")],
    [Entry("file", "/abs-by-layer", b"x")],
], ids=["dotdot", "absolute"])
def test_unsafe_paths(shimd: ShimdProcess, own_registry: Registry, entries: list[Entry]) -> None:
    ref = own_registry.client().push_image("unsafe", "v1", img.make_image([img.make_layer(entries)]))
    expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "layer")
    assert not list(shimd.base.rglob("escaped-by-layer")) and not list(shimd.base.rglob("abs-by-layer"))


def test_escaping_symlink(shimd: ShimdProcess, own_registry: Registry, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = img.make_layer([Entry("symlink", "esc", target=str(outside)), Entry("file", "esc/pwned", b"x")])
    ref = own_registry.client().push_image("symesc", "v1", img.make_image([img.busybox_layer(), layer]))
    expect(shimd, ref, grpc.StatusCode.FAILED_PRECONDITION, "symlink")
    assert list(outside.iterdir()) == []


def test_failed_pull_then_good_pull(shimd: ShimdProcess, own_registry: Registry) -> None:
    """A corrupt blob is refused; once the registry serves it right, the same pull completes."""
    man = img.make_image([img.busybox_layer(), img.make_layer([Entry("file", "y", b"y" * 3000)])])
    ref = own_registry.client().push_image("healed", "v1", man)
    path = own_registry.blob_path(man.layers[1].digest)
    good = path.read_bytes()
    path.write_bytes(b"\0" * len(good))
    expect(shimd, ref, grpc.StatusCode.UNAVAILABLE, "corrupted")
    path.write_bytes(good)
    assert pull(shimd, ref) == man.config_digest
    assert_store_consistent(shimd)


def test_arch_missing_from_index(shimd: ShimdProcess, own_registry: Registry) -> None:
    arm = img.make_image([img.make_layer([Entry("file", "ARCH", b"arm64\n")])], arch="arm64")
    ref = own_registry.client().push_image("armonly", "v1", img.make_index([arm]))
    expect(shimd, ref, grpc.StatusCode.NOT_FOUND, "linux/amd64")


def test_a_local_service_named_as_a_registry_is_not_echoed(shimd: ShimdProcess) -> None:
    """An image naming a plain HTTP service on the node (reached without configuration, as a registry on
    127.0.0.1 is) gets its status in the error, never its body; a registry's own error document does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            registry_like = self.path.startswith("/v2/registry-like/")
            body = (b'{"errors": [{"code": "DENIED", "message": "quota reached"}]}' if registry_like
                    else b"<html>internal page: secret-token</html>")
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        details = expect(shimd, f"127.0.0.1:{port}/app:v1", grpc.StatusCode.FAILED_PRECONDITION, "answered 400")
        assert "secret-token" not in details and "internal page" not in details
        expect(shimd, f"127.0.0.1:{port}/registry-like:v1", grpc.StatusCode.FAILED_PRECONDITION,
               "answered 400: DENIED: quota reached")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
