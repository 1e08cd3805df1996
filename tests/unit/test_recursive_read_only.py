"""CRI Mount.recursive_read_only: validation, the OCI option, the handler feature flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from shimd.api.runtime import v1 as cri
from shimd.config import HandlerConfig, parse
from shimd.cri import runtime_info, validate
from shimd.errors import InvalidArgument
from shimd.oci import spec
from shimd.runtimes import runc as runc_driver
from shimd.runtimes.runsc import RunscRuntime
from shimd.runtimes.shimv2 import ShimV2Runtime


def _cfg(*mounts: cri.Mount) -> cri.ContainerConfig:
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="img"),
                               command=["sh"], mounts=list(mounts))


def _pod() -> spec.PodContext:
    return spec.PodContext(pod_id="p" * 64, name="pod", namespace="ns", uid="u", hostname="pod",
                           namespaces={"network": "/run/ns/net"}, files={}, cgroups_path="/shimd/podx/c")


def _image(tmp_path: Path) -> spec.ImageContext:
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\n")
    return spec.ImageContext(name="img", config={"Cmd": ["sh"]}, layers=[str(tmp_path)])


def test_rro_becomes_the_rro_option_after_ro(tmp_path: Path) -> None:
    cfg = _cfg(cri.Mount(container_path="/a", host_path="/h/a", readonly=True, recursive_read_only=True),
               cri.Mount(container_path="/b", host_path="/h/b", readonly=True))
    s = spec.container_spec("c" * 64, validate.container_config(cfg), _pod(), _image(tmp_path), "/rootfs", min_oom=0)
    by_dest = {m["destination"]: m["options"] for m in s["mounts"]}
    assert by_dest["/a"] == ["rbind", "rprivate", "ro", "rro"]
    assert by_dest["/b"] == ["rbind", "rprivate", "ro"]


@pytest.mark.parametrize(("mount", "needs"), [
    (cri.Mount(container_path="/a", host_path="/h", readonly=False, recursive_read_only=True), "readonly"),
    (cri.Mount(container_path="/a", host_path="/h", readonly=True, recursive_read_only=True,
               propagation=cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER), "propagation"),
    (cri.Mount(container_path="/a", host_path="/h", readonly=True, recursive_read_only=True,
               propagation=cri.MountPropagation.PROPAGATION_BIDIRECTIONAL), "propagation"),
])
def test_rro_needs_readonly_and_private_propagation(mount: cri.Mount, needs: str) -> None:
    ok = cri.Mount(container_path="/ok", host_path="/h", readonly=True, recursive_read_only=True)
    with pytest.raises(InvalidArgument) as e:
        validate.container_config(_cfg(ok, mount))
    assert "config.mounts[1].recursive_read_only" in str(e.value)
    assert f"config.mounts[1].{needs}" in str(e.value)


def test_kernel_version_check() -> None:
    assert runc_driver.kernel_at_least((5, 12), "6.18.44-fc-v1252")
    assert runc_driver.kernel_at_least((5, 12), "5.12.0-rc1")
    assert not runc_driver.kernel_at_least((5, 12), "5.11.22")
    assert not runc_driver.kernel_at_least((5, 12), "4.19.0")
    assert not runc_driver.kernel_at_least((5, 12), "garbage")


def _fake_runtime(tmp_path: Path, features: str, code: int = 0) -> str:
    exe = tmp_path / "fake-runc"
    exe.write_text(f"#!/bin/sh\n[ \"$1\" = features ] || exit 1\ncat <<'EOF'\n{features}\nEOF\nexit {code}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize(("features", "code", "want"), [
    ('{"mountOptions": ["ro", "rro", "rbind"]}', 0, True),
    ('{"mountOptions": ["ro", "rbind"]}', 0, False),
    ("no such command", 1, False),  # runc before 1.1
    ("not json", 0, False),
])
def test_runc_driver_asks_runc_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, features: str, code: int,
                                        want: bool) -> None:
    monkeypatch.setattr(runc_driver, "kernel_at_least", lambda version, release=None: True)
    binary = _fake_runtime(tmp_path, features, code)
    drv = runc_driver.RuncRuntime(HandlerConfig(name="r", driver="runc", binary=binary), tmp_path)
    assert drv.recursive_read_only_mounts() is want
    # Cached: a runtime that stops answering does not change the answer.
    Path(binary).unlink()
    assert drv.recursive_read_only_mounts() is want


def test_runc_driver_without_a_binary_says_no_and_asks_again(tmp_path: Path) -> None:
    drv = runc_driver.RuncRuntime(HandlerConfig(name="r", driver="runc", binary=str(tmp_path / "runc")), tmp_path)
    assert drv.recursive_read_only_mounts() is False
    # Installed later: a failed probe is not cached.
    Path(_fake_runtime(tmp_path, '{"mountOptions": ["rro"]}')).rename(tmp_path / "runc")
    assert drv.recursive_read_only_mounts() is runc_driver.kernel_at_least(runc_driver.RRO_MIN_KERNEL)


def test_sandboxed_handlers_do_not_claim_rro(tmp_path: Path) -> None:
    assert RunscRuntime(HandlerConfig(name="gv", driver="runsc", binary="runc"), tmp_path) \
        .recursive_read_only_mounts() is False
    h = HandlerConfig(name="v2", driver="shimv2", binary="containerd-shim-runc-v2",
                      runtime_type="io.containerd.runc.v2")
    assert ShimV2Runtime(h, tmp_path).recursive_read_only_mounts() is False


def test_status_reports_rro_per_handler_and_for_the_default() -> None:
    cfg = parse({})
    handlers = [(cfg.daemon.default_handler, True, "", True, True), ("other", True, "", False, False)]
    resp = runtime_info.status(cfg, handlers, (True, "", ""), verbose=False)
    got = {h.name: (h.features.recursive_read_only_mounts, h.features.user_namespaces)
           for h in resp.runtime_handlers}
    assert got == {"": (True, True), cfg.daemon.default_handler: (True, True), "other": (False, False)}
