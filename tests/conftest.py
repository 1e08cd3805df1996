"""Shared fixtures. Each area keeps its fixtures in a plugin module under tests/support/."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import ShimdProcess

pytest_plugins: list[str] = [
    "tests.support.network",
    "tests.support.registry",
    "tests.support.runtime",
    "tests.support.sandboxed",
    "tests.support.shim_env",
    "tests.support.streaming_fixtures",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="integration tests need root (namespaces, mounts, runc)")
        for item in items:
            if "integration" in item.nodeid:
                item.add_marker(skip)


@pytest.fixture
def tmp_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short private directory (unix socket paths must stay under 108 bytes)."""
    base = Path(tmp_path_factory.mktemp("sd"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shimd_factory(tmp_base: Path) -> Iterator[object]:
    """Start shimd processes with optional extra TOML; all are stopped at teardown."""
    started: list[ShimdProcess] = []

    def make(extra_config: str = "", base: Path | None = None) -> ShimdProcess:
        proc = ShimdProcess(base or tmp_base, extra_config)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()
