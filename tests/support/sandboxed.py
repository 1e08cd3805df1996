"""Fixtures for sandboxed-handler tests: a shimd with runc, runsc and shim v2 handlers configured."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import ShimdProcess
from tests.support.runtime import Runtime, runtime_config

RUNC_V2_SHIM = shutil.which("containerd-shim-runc-v2")
KATA_SHIM = shutil.which("containerd-shim-kata-v2")
KATA_CONFIG = "/etc/kata-containers/configuration.toml"

# Handler name -> TOML table body. "runcv2" is Debian's containerd-shim-runc-v2 driven as a shim v2 binary.
SHIMV2_HANDLERS = {
    "runcv2": 'driver = "shimv2"\nbinary = "containerd-shim-runc-v2"\nruntime_type = "io.containerd.runc.v2"\n',
    "kata": ('driver = "shimv2"\nbinary = "containerd-shim-kata-v2"\nruntime_type = "io.containerd.kata.v2"\n'
             f'config_path = "{KATA_CONFIG}"\n'),
    "missing": 'driver = "shimv2"\nbinary = "containerd-shim-nosuch-v2"\nruntime_type = "io.containerd.nosuch.v2"\n',
}


def handlers_toml() -> str:
    out = []
    for name, body in SHIMV2_HANDLERS.items():
        if name == "kata" and KATA_SHIM is None:
            continue  # its config_path would not exist either
        out.append(f"[handlers.{name}]\n{body}")
    return "".join(out)


def shimv2_params() -> list[object]:
    """The shim v2 handlers to run the same tests against; kata skips with a reason when absent."""
    return [
        pytest.param("runcv2", marks=pytest.mark.skipif(RUNC_V2_SHIM is None,
                                                        reason="containerd-shim-runc-v2 is not installed")),
        pytest.param("kata", marks=pytest.mark.skipif(KATA_SHIM is None,
                                                      reason="containerd-shim-kata-v2 is not installed "
                                                             "(Kata Containers is not packaged for this host)")),
    ]


@pytest.fixture
def rt_sandboxed(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str],
                 cni_loopback_dir: Path) -> Iterator[Runtime]:
    """Like `rt`, with the shim v2 handlers configured next to the default runc and runsc ones."""
    host, ref = busybox_registry
    proc = shimd_factory(runtime_config(host, cni_loopback_dir) + handlers_toml())
    proc.start()
    runtime = Runtime(proc, ref)
    runtime.client.images.PullImage(runtime.pb.PullImageRequest(image=runtime.pb.ImageSpec(image=ref)))
    yield runtime
    runtime.cleanup()
