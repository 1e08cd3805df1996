"""Fixtures for the conformance clients: a local registry standing in for the public ones, and shimd
instances of their own whose registry mirrors point there."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import critest_images
from tests.support.daemon import ShimdProcess
from tests.support.network import CNI_BIN_DIRS, CniNetwork
from tests.support.registry import Registry, start_registry
from tests.support.runtime import kill_strays


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1 holding every image the conformance clients pull, under its public path."""
    reg = start_registry(tmp_path_factory.mktemp("conformance-reg"))
    try:
        critest_images.push_all(reg.client())
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def conformance_base() -> Iterator[Path]:
    """Traversable by others (0711, unlike pytest's 0700 tmp dirs): user-namespaced pods run as a mapped
    root that must reach their rootfs below it."""
    base = Path(tempfile.mkdtemp(prefix="shimd-conf-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


MirroredShimd = Callable[[str], ShimdProcess]


@pytest.fixture
def mirrored_shimd(conformance_base: Path, mirror: Registry, cni_network: CniNetwork) -> Iterator[MirroredShimd]:
    """Starts a shimd on `conformance_base` with the mirrors and a private CNI network; stops it and anything
    it left at teardown."""
    started: list[ShimdProcess] = []

    def start(extra_config: str = "") -> ShimdProcess:
        cni_network.write()
        proc = ShimdProcess(conformance_base, critest_images.mirrors_toml(mirror.url)
                            + f'[cni]\nconf_dir = "{cni_network.conf_dir}"\nbin_dirs = {json.dumps(CNI_BIN_DIRS)}\n'
                            + extra_config)
        started.append(proc)
        proc.start(timeout=30)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
            kill_strays(proc.base)
