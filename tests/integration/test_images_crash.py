"""Concurrency and crashes: shared downloads, SIGKILL mid-pull, restart."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

from tests.integration.test_images_errors import assert_store_consistent
from tests.integration.test_images_pull import listed, pull, snapshots
from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.images import Entry
from tests.support.registry import Registry, insecure_toml, start_registry


def test_concurrent_pulls_download_each_blob_once(tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "reg")
    proc = ShimdProcess(tmp_path, insecure_toml(reg))
    try:
        c = reg.client()
        a = img.make_image([img.busybox_layer(), img.make_layer([Entry("file", "a", b"a" * 100_000)])])
        b = img.make_image([img.busybox_layer(), img.make_layer([Entry("file", "b", b"b" * 100_000)])])
        ref_a, ref_b = c.push_image("share", "a", a), c.push_image("share", "b", b)
        proc.start()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda r: pull(proc, r), [ref_a, ref_a, ref_b, ref_a]))
        assert results == [a.config_digest, a.config_digest, b.config_digest, a.config_digest]
        for blob in {layer.digest for layer in [*a.layers, *b.layers]} | {a.config_digest, b.config_digest}:
            assert reg.blob_gets(blob) == 1, blob
        assert_store_consistent(proc)
    finally:
        proc.stop()
        reg.stop()


def test_sigkill_mid_pull_then_restart(tmp_path: Path, registry: Registry,
                                       big_image_ref: tuple[str, img.Manifest]) -> None:
    ref, man = big_image_ref
    proc = ShimdProcess(tmp_path, insecure_toml(registry))
    try:
        proc.start()
        c = proc.client
        assert c is not None
        fut = c.images.PullImage.future(c.pb.PullImageRequest(image=c.pb.ImageSpec(image=ref)), timeout=120)
        ingest = proc.root / "images" / "ingest"
        deadline = time.monotonic() + 30
        # Wait until blobs are actually streaming in, then crash.
        while time.monotonic() < deadline and not fut.done():
            if ingest.is_dir() and sum(p.stat().st_size for p in ingest.iterdir() if p.exists()) > 5_000_000:
                break
            time.sleep(0.005)
        assert not fut.done(), "pull finished before it could be interrupted"
        proc.kill()
        proc.start()
        images = listed(proc)
        assert images == [] or [i.id for i in images] == [man.config_digest]   # absent or whole, never half
        assert_store_consistent(proc)
        assert pull(proc, ref) == man.config_digest
        assert proc.proc is not None
        with open(f"/proc/{proc.proc.pid}/status") as f:
            peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        assert peak_kb < 150 * 1024, f"shimd peak RSS {peak_kb} kB during a 60 MB pull"   # blobs are streamed
        layers = snapshots(proc, ref)
        assert len(layers) == len(man.layers)
        for i, layer in enumerate(reversed(layers[:-1])):
            assert (layer / "blob" / f"part{i}").stat().st_size == 60 * 1024 * 1024 // 4
        assert_store_consistent(proc)
    finally:
        proc.stop()
