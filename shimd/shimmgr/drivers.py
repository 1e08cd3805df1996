"""Runtime handler -> driver. A driver knows how to launch its shim and what to pass it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from shimd import log
from shimd.config import Config, HandlerConfig


class Driver(Protocol):
    handler: HandlerConfig
    supports_user_namespaces: bool

    def available(self) -> tuple[bool, str]: ...

    def shim_argv(self) -> list[str]: ...

    def shim_env(self) -> dict[str, str]: ...

    def runtime_options(self) -> Any: ...

    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]: ...

    def needs_sandbox_task(self, shared_pid: bool) -> bool: ...

    def recursive_read_only_mounts(self) -> bool: ...

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None: ...


class DriverBase:
    """What every concrete driver holds, and the cached availability probe they share."""

    supports_user_namespaces = False
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

    def recursive_read_only_mounts(self) -> bool:
        """Whether the handler can honour CRI Mount.recursive_read_only ("rro"); only runc proves it."""
        return False


class UnavailableDriver:
    """Stands in for a driver whose code is missing, so one bad handler never breaks the others."""

    supports_user_namespaces = False

    def __init__(self, handler: HandlerConfig, why: str) -> None:
        self.handler = handler
        self.why = why

    def available(self) -> tuple[bool, str]:
        return False, self.why

    def recursive_read_only_mounts(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"driver for handler {self.handler.name!r} is unavailable: {self.why}")


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
