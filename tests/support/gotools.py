"""The Go programs the conformance tests drive, built by tests/tools/install.sh into .tools/bin."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".tools" / "bin"


def tool(name: str) -> Path:
    """The path of a built tool. Skipped, with the reason printed, only where Go itself is missing: with Go
    on the machine a missing tool means its build failed, and that fails the test."""
    path = BIN / name
    if path.is_file():
        return path
    if shutil.which("go") is None:
        pytest.skip(f"{name}: Go is not installed, so tests/tools/install.sh could not build it")
    pytest.fail(f"{name} is missing from {BIN} although Go is installed: run tests/tools/install.sh and read its error")
