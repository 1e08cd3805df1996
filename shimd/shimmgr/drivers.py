"""Runtime handler -> driver. A driver knows how to launch its shim and what to pass it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

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

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None: ...


class UnavailableDriver:
    """Stands in for a driver whose code is missing, so one bad handler never breaks the others."""

    supports_user_namespaces = False

    def __init__(self, handler: HandlerConfig, why: str) -> None:
        self.handler = handler
        self.why = why

    def available(self) -> tuple[bool, str]:
        return False, self.why

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
