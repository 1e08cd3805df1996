"""shimd/shimmgr/drivers.py: the Driver interface is complete, every driver has all of it, and an
unavailable handler's stand-in answers FAILED_PRECONDITION saying why (issue 17, item 1)."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from shimd import errors
from shimd.config import HandlerConfig, parse
from shimd.shimmgr import drivers
from shims.kata.driver import ShimV2Driver
from shims.runc.driver import RuncDriver
from shims.runsc.driver import RunscDriver

REPO = Path(__file__).resolve().parents[2]
OPTIONAL = {"direct_launch", "zygote_argv", "stats_sampler", "supports_user_namespaces", "follows_log_rotation",
            "recursive_read_only_mounts"}


def _members() -> set[str]:
    declared = {name for name in vars(drivers.Driver) if not name.startswith("_")}
    return declared | set(drivers.Driver.__annotations__)


def test_the_interface_declares_every_capability_shimd_uses() -> None:
    assert OPTIONAL <= _members()
    assert {"available", "shim_argv", "shim_env", "runtime_options", "log_stdio", "needs_sandbox_task",
            "cleanup_after_dead_shim", "handler"} <= _members()


@pytest.mark.parametrize("cls", [RuncDriver, RunscDriver, ShimV2Driver, drivers.UnavailableDriver])
def test_every_driver_has_the_whole_interface(cls: type) -> None:
    missing = sorted(name for name in _members() - {"handler"} if not hasattr(cls, name))
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert "__getattr__" not in vars(cls)


def test_optional_capabilities_as_each_driver_has_them(tmp_path: Path) -> None:
    runc = RuncDriver(HandlerConfig(name="runc", driver="runc", binary="runc"), tmp_path)
    runsc = RunscDriver(HandlerConfig(name="gv", driver="runsc", binary="runsc"), tmp_path)
    v2 = ShimV2Driver(HandlerConfig(name="v2", driver="shimv2", binary="containerd-shim-runc-v2"), tmp_path)
    for drv in (runc, runsc):
        assert drv.direct_launch("k8s.io", "p", "/run/shimd.sock", str(tmp_path)) is not None
        assert drv.zygote_argv() is not None
    assert v2.direct_launch("k8s.io", "p", "/run/shimd.sock", str(tmp_path)) is None and v2.zygote_argv() is None
    assert runc.stats_sampler() is None and v2.stats_sampler() is None
    assert runsc.stats_sampler() == runsc.container_sample
    assert (runc.follows_log_rotation, runsc.follows_log_rotation, v2.follows_log_rotation) == (False, False, True)
    assert (runc.supports_user_namespaces, runsc.supports_user_namespaces) == (True, False)


def _arguments(method: Any) -> list[Any]:
    samples = {"log_path": "/var/log/x.log", "stdin_path": "", "shared_pid": True, "container_ids": ["c"],
               "bundles": [Path("/nonexistent")], "namespace": "k8s.io", "pod_id": "p", "shimd_address": "/s",
               "shim_dir": "/d"}
    return [samples[name] for name in list(inspect.signature(method).parameters)[1:]]


def test_unavailable_driver_refuses_every_operation_saying_why() -> None:
    drv = drivers.UnavailableDriver(HandlerConfig(name="kata", driver="shimv2"), "no module named shims.kata")
    assert drv.available() == (False, "no module named shims.kata")
    assert (drv.direct_launch("k8s.io", "p", "/s", "/d"), drv.zygote_argv(), drv.stats_sampler()) == (None, None, None)
    assert not drv.supports_user_namespaces and not drv.follows_log_rotation
    operations = sorted(_members() - OPTIONAL - {"handler", "available"})
    assert operations
    for name in operations:
        method = getattr(type(drv), name)
        with pytest.raises(errors.FailedPrecondition, match=r"runtime handler 'kata' is not usable: no module named"):
            result = method(drv, *_arguments(method))
            if inspect.iscoroutine(result):
                asyncio.run(result)


def test_a_driver_that_cannot_be_loaded_becomes_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(drivers._DRIVER_CLASSES, "runc", ("shims.no_such_runtime.driver", "Driver"))
    cfg = parse({})
    drv = drivers.make_driver(cfg.handlers["runc"], cfg, tmp_path)
    assert isinstance(drv, drivers.UnavailableDriver)
    ok, why = drv.available()
    assert not ok and "cannot be loaded" in why and "shims.no_such_runtime" in why


def test_no_capability_is_probed_with_getattr() -> None:
    # The interface is complete: a driver's members are called, never looked for.
    files = [*(REPO / "shimd" / "shimmgr").glob("*.py"), *(REPO / "shims").glob("*/driver.py"),
             REPO / "shimd" / "containers" / "service.py", REPO / "shimd" / "pods" / "service.py",
             REPO / "shimd" / "stats" / "collector.py"]
    probes = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files
              for n, line in enumerate(path.read_text().splitlines(), start=1)
              if re.search(r"\b(getattr|hasattr)\((drv|driver|self\.drivers|.*\.drivers\.get)", line)]
    assert not probes, probes
