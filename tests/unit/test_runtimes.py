"""shimd/runtimes/: the Runtime interface is complete, every kind implements all of it, the kinds are a plain
mapping, an unusable handler's stand-in answers FAILED_PRECONDITION saying why, and the default handler is
worked out in one place (issue 17, item 1)."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from shimd import errors
from shimd.config import HandlerConfig, parse
from shimd.runtimes import registry
from shimd.runtimes.base import Runtime, UnavailableRuntime
from shimd.runtimes.runc import RuncRuntime
from shimd.runtimes.runsc import RunscRuntime
from shimd.runtimes.shimv2 import ShimV2Runtime

REPO = Path(__file__).resolve().parents[2]
CAPABILITIES = {"available", "supports_user_namespaces", "follows_log_rotation", "recursive_read_only_mounts",
                "launch", "needs_sandbox_task", "sandbox_task_needs_network", "log_stdio", "runtime_options",
                "stats_sampler", "cleanup_after_dead_shim"}
# Answers that do not refuse: what a handler can do (all off when it is unusable).
QUERIES = {"available", "supports_user_namespaces", "follows_log_rotation", "recursive_read_only_mounts",
           "stats_sampler", "sandbox_task_needs_network"}


def test_the_interface_is_every_capability_and_all_abstract() -> None:
    assert Runtime.__abstractmethods__ == CAPABILITIES
    for name in CAPABILITIES:
        member = inspect.getattr_static(Runtime, name)
        doc = (member.fget if isinstance(member, property) else member).__doc__
        assert doc and doc.strip(), f"Runtime.{name} is not documented"


@pytest.mark.parametrize("cls", [RuncRuntime, RunscRuntime, ShimV2Runtime, UnavailableRuntime])
def test_every_kind_implements_the_whole_interface(cls: type) -> None:
    assert issubclass(cls, Runtime)
    assert not inspect.isabstract(cls), f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
    assert "__getattr__" not in vars(cls)


def test_kinds_are_a_plain_mapping_of_every_configurable_driver() -> None:
    from shimd.config import DRIVERS

    assert registry.KINDS == {"runc": RuncRuntime, "runsc": RunscRuntime, "shimv2": ShimV2Runtime}
    assert set(DRIVERS) == set(registry.KINDS)
    assert "importlib" not in (REPO / "shimd" / "runtimes" / "registry.py").read_text()


def test_capabilities_as_each_kind_has_them(tmp_path: Path) -> None:
    runc = RuncRuntime(HandlerConfig(name="runc", driver="runc", binary="runc"), tmp_path)
    runsc = RunscRuntime(HandlerConfig(name="gv", driver="runsc", binary="runsc"), tmp_path)
    v2 = ShimV2Runtime(HandlerConfig(name="v2", driver="shimv2", binary="containerd-shim-runc-v2"), tmp_path)
    assert runc.stats_sampler() is None and v2.stats_sampler() is None
    assert runsc.stats_sampler() == runsc.container_sample
    assert (runc.follows_log_rotation, runsc.follows_log_rotation, v2.follows_log_rotation) == (False, False, True)
    assert (runc.supports_user_namespaces, runsc.supports_user_namespaces, v2.supports_user_namespaces) == \
        (True, False, False)
    assert (runc.needs_sandbox_task(False), runsc.needs_sandbox_task(False), v2.needs_sandbox_task(False)) == \
        (False, True, True)
    assert (runc.sandbox_task_needs_network, runsc.sandbox_task_needs_network, v2.sandbox_task_needs_network) == \
        (False, True, True)


def _arguments(method: Any) -> list[Any]:
    samples = {"log_path": "/var/log/x.log", "stdin_path": "", "shared_pid": True, "container_ids": ["c"],
               "bundles": [Path("/nonexistent")], "pod_id": "p", "bundle": Path("/nonexistent")}
    return [samples[name] for name in list(inspect.signature(method).parameters)[1:]]


def test_unavailable_runtime_refuses_every_operation_saying_why() -> None:
    rt = UnavailableRuntime(HandlerConfig(name="kata", driver="shimv2"), "containerd-shim-kata-v2 not found")
    assert rt.available() == (False, "containerd-shim-kata-v2 not found")
    assert not rt.supports_user_namespaces and not rt.follows_log_rotation and not rt.recursive_read_only_mounts()
    assert rt.stats_sampler() is None and rt.sandbox_task_needs_network
    operations = sorted(CAPABILITIES - QUERIES)
    assert operations == ["cleanup_after_dead_shim", "launch", "log_stdio", "needs_sandbox_task", "runtime_options"]
    for name in operations:
        method = getattr(type(rt), name)
        with pytest.raises(errors.FailedPrecondition, match=r"runtime handler 'kata' is not usable: containerd-shim"):
            result = method(rt, *_arguments(method))
            if inspect.iscoroutine(result):
                asyncio.run(result)


def test_a_runtime_that_cannot_be_set_up_becomes_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    class Broken(RuncRuntime):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("no state directory")

    monkeypatch.setitem(registry.KINDS, "runc", Broken)
    cfg = parse({})
    runtimes = registry.Runtimes(cfg, tmp_path)
    rt = runtimes.configured("runc")
    assert isinstance(rt, UnavailableRuntime)
    ok, why = rt.available()
    assert not ok and "cannot be set up" in why and "no state directory" in why
    with pytest.raises(errors.FailedPrecondition, match=r"runtime handler 'runc' is not usable: .*no state directory"):
        runtimes.get("runc")
    # The other handlers are untouched.
    assert isinstance(runtimes.configured("runsc"), RunscRuntime)


def test_the_default_handler_is_worked_out_in_one_place(tmp_path: Path) -> None:
    cfg = parse({"daemon": {"default_handler": "runsc"}})
    runtimes = registry.Runtimes(cfg, tmp_path)
    assert runtimes.name("") == "runsc" and runtimes.name("runc") == "runc"
    assert runtimes.configured("") is runtimes.configured("runsc")
    assert runtimes.sampler_for("") is not None and runtimes.sampler_for("runc") is None
    with pytest.raises(errors.InvalidArgument, match=r"runtime_handler 'nope' is not configured; known handlers"):
        runtimes.get("nope")
    gone = runtimes.configured("nope")
    assert isinstance(gone, UnavailableRuntime) and not gone.available()[0]
    # Nobody else reads the configured default.
    readers = [str(p.relative_to(REPO)) for p in (REPO / "shimd").rglob("*.py")
               if "default_handler" in p.read_text() and p.name not in ("config.py", "registry.py")]
    assert sorted(readers) == ["shimd/check.py", "shimd/cri/runtime_info.py"], readers


def test_no_capability_is_probed_with_getattr() -> None:
    # The interface is complete: a runtime's members are called, never looked for.
    files = [*(REPO / "shimd" / "shimmgr").glob("*.py"), *(REPO / "shimd" / "runtimes").glob("*.py"),
             REPO / "shimd" / "containers" / "service.py", REPO / "shimd" / "pods" / "service.py",
             REPO / "shimd" / "stats" / "collector.py"]
    probes = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files
              for n, line in enumerate(path.read_text().splitlines(), start=1)
              if re.search(r"\b(getattr|hasattr)\((drv|rt|runtime|.*runtimes\b)", line)]
    assert not probes, probes
