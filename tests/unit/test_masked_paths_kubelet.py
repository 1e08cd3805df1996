"""shimd's default /proc masks and the bench's kubelet request, pinned to kubelet's own lists.

kubelet (pkg/securitycontext) sends these for every container of the default procMount; shimd uses the same
for a client that sends none, and bench_pod_start sends them as kubelet does. Read from the kubelet module the
test setup builds (tests/tools/kubelet); skipped where that source is not in the Go module cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shimd.oci.spec import DEFAULT_MASKED, DEFAULT_READONLY
from tests.bench.bench_pod_start import KUBELET_MASKED, KUBELET_READONLY

ROOT = Path(__file__).resolve().parents[2]


def _kubelet_util_go() -> str:
    version = re.search(r"^require k8s\.io/kubernetes (\S+)$", (ROOT / "tests/tools/kubelet/go.mod").read_text(), re.M)
    go = shutil.which("go")
    if version is None or go is None:
        pytest.skip("no Go or no pinned kubelet module")
    cache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, timeout=60).stdout.strip()
    path = Path(cache) / f"k8s.io/kubernetes@{version.group(1)}/pkg/securitycontext/util.go"
    if not path.is_file():
        pytest.skip(f"{path} not downloaded (make tools fetches it)")
    return path.read_text()


def _string_list(source: str, name: str) -> list[str]:
    """The string literals of `name = ...{ ... }` up to the list's closing brace."""
    start = re.search(rf"\b{name}\s*=", source)
    assert start is not None, f"{name} not found in kubelet's securitycontext/util.go"
    body = source[start.end():]
    body = body[body.index("{") + 1:body.index("}")]
    return re.findall(r'"([^"]+)"', body)


def test_default_masks_are_kubelets() -> None:
    source = _kubelet_util_go()
    masked, readonly = _string_list(source, "defaultMaskedPaths"), _string_list(source, "defaultReadonlyPaths")
    assert masked and readonly
    assert sorted(DEFAULT_MASKED) == sorted(masked)
    assert sorted(DEFAULT_READONLY) == sorted(readonly)
    assert KUBELET_MASKED == masked and KUBELET_READONLY == readonly
