"""Runtime handler -> driver. A driver knows how to launch its shim and what to pass it."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from shimd import errors, log
from shimd.config import Config, HandlerConfig

if TYPE_CHECKING:
    from shimd.shimmgr.launcher import DirectLaunch
    from shimd.stats.cgroupfs import Sample


# (argv, stamp of the shim code, environment) of a shim zygote
ZygoteSpec = tuple[list[str], str, dict[str, str]]
# One container's usage as the runtime itself accounts it (container id -> sample, None if unknown)
Sampler = Callable[[str], Awaitable["Sample | None"]]


class Driver(Protocol):
    """Everything shimd asks of a runtime handler's driver; nothing else is looked up on one."""

    handler: HandlerConfig
    supports_user_namespaces: bool  # pods with their own user namespace can run on it
    follows_log_rotation: bool  # its log writer notices a renamed log file (ReopenContainerLog has nothing to do)

    def available(self) -> tuple[bool, str]: ...

    def shim_argv(self) -> list[str]: ...

    def shim_env(self) -> dict[str, str]: ...

    def direct_launch(self, namespace: str, pod_id: str, shimd_address: str, shim_dir: str) -> DirectLaunch | None:
        """How shimd starts the shim itself on a socket it binds; None: the shim v2 way (shim_argv, `start`)."""
        ...

    def zygote_argv(self) -> ZygoteSpec | None:
        """A zygote that forks this driver's direct-launched shims; None: none."""
        ...

    def runtime_options(self) -> Any: ...

    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]: ...

    def needs_sandbox_task(self, shared_pid: bool) -> bool: ...

    def recursive_read_only_mounts(self) -> bool:
        """Whether the handler can honour CRI Mount.recursive_read_only ("rro")."""
        ...

    def stats_sampler(self) -> Sampler | None:
        """The runtime's own per-container stats; None: the container's cgroup tells the story."""
        ...

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None: ...


class Defaults:
    """What a driver has unless it says otherwise: the optional capabilities, all off."""

    supports_user_namespaces = False
    follows_log_rotation = False

    def direct_launch(self, namespace: str, pod_id: str, shimd_address: str, shim_dir: str) -> DirectLaunch | None:
        return None

    def zygote_argv(self) -> ZygoteSpec | None:
        return None

    def stats_sampler(self) -> Sampler | None:
        return None

    def recursive_read_only_mounts(self) -> bool:
        """Only a runtime that proves it (runc's `features` listing "rro") says yes."""
        return False


class DriverBase(Defaults):
    """What every concrete driver holds, and the cached availability probe they share."""

    log_name = "driver"

    def __init__(self, handler: HandlerConfig, state_dir: Path, systemd_cgroup: bool = False,
                 runtime_timeout: float = 60.0) -> None:
        self.handler = handler
        self.state_dir = state_dir
        self.systemd_cgroup = systemd_cgroup
        self.runtime_timeout = runtime_timeout
        self.root = handler.root or str(state_dir / handler.name)
        self._available: tuple[bool, str] | None = None
        self.log = log.get(self.log_name, handler=handler.name)

    def available(self) -> tuple[bool, str]:
        """Probed until it succeeds, then cached (Status asks on every call)."""
        if self._available is None or not self._available[0]:
            self._available = self._probe()
        return self._available

    def _probe(self) -> tuple[bool, str]:
        raise NotImplementedError


class UnavailableDriver(Defaults):
    """Stands in for a driver whose code is missing, so one bad handler never breaks the others.

    Every operation is refused with FAILED_PRECONDITION saying why; the optional capabilities are off.
    """

    def __init__(self, handler: HandlerConfig, why: str) -> None:
        self.handler = handler
        self.why = why

    def _refuse(self) -> NoReturn:
        raise errors.FailedPrecondition(f"runtime handler {self.handler.name!r} is not usable: {self.why}")

    def available(self) -> tuple[bool, str]:
        return False, self.why

    def shim_argv(self) -> list[str]:
        self._refuse()

    def shim_env(self) -> dict[str, str]:
        self._refuse()

    def runtime_options(self) -> Any:
        self._refuse()

    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]:
        self._refuse()

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        self._refuse()

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None:
        self._refuse()


_DRIVER_CLASSES = {
    "runc": ("shims.runc.driver", "RuncDriver"),
    "runsc": ("shims.runsc.driver", "RunscDriver"),
    "shimv2": ("shims.kata.driver", "ShimV2Driver"),
}


def make_driver(handler: HandlerConfig, cfg: Config, state_dir: Path) -> Driver:
    module_name, class_name = _DRIVER_CLASSES[handler.driver]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(handler, state_dir, systemd_cgroup=cfg.daemon.cgroup_driver == "systemd",  # type: ignore[no-any-return]
                   runtime_timeout=cfg.daemon.runtime_timeout_seconds)
    except Exception as e:  # one broken driver must not take the daemon or the other handlers down
        return UnavailableDriver(handler, f"driver {handler.driver!r} cannot be loaded: {e}")
