"""Runtime handler name -> Runtime: the one place that knows the kinds and works out the default handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shimd import errors
from shimd.config import Config, HandlerConfig
from shimd.runtimes.base import Runtime, RuntimeBase, Sampler, UnavailableRuntime
from shimd.runtimes.runc import RuncRuntime
from shimd.runtimes.runsc import RunscRuntime
from shimd.runtimes.shimv2 import ShimV2Runtime
from shimd.shimmgr.zygote import ZygoteSlot

# HandlerConfig.driver -> the class that runs it (the config accepts exactly these names).
KINDS: dict[str, type[RuntimeBase]] = {
    "runc": RuncRuntime,
    "runsc": RunscRuntime,
    "shimv2": ShimV2Runtime,
}


def make_runtime(handler: HandlerConfig, cfg: Config, state_dir: Path, zygote: ZygoteSlot | None = None) -> Runtime:
    cls = KINDS.get(handler.driver)
    if cls is None:
        return UnavailableRuntime(handler, f"no runtime of kind {handler.driver!r} (known: {', '.join(sorted(KINDS))})")
    try:
        return cls(handler, state_dir, systemd_cgroup=cfg.daemon.cgroup_driver == "systemd",
                   runtime_timeout=cfg.daemon.runtime_timeout_seconds, shimd_address=cfg.daemon.socket,
                   zygote=zygote)
    except Exception as e:  # one broken runtime must not take the daemon or the other handlers down
        return UnavailableRuntime(handler, f"runtime {handler.driver!r} cannot be set up: {e}")


class Runtimes:
    """Every configured handler's Runtime, and the shim zygote the runc-based ones share."""

    def __init__(self, cfg: Config, state_dir: Path) -> None:
        self.default_name = cfg.daemon.default_handler
        self.zygote = ZygoteSlot(state_dir)
        self._by_name: dict[str, Runtime] = {name: make_runtime(h, cfg, state_dir, self.zygote)
                                             for name, h in cfg.handlers.items()}

    def name(self, handler: str) -> str:
        """The handler a request means: CRI's empty runtime_handler is the configured default."""
        return handler or self.default_name

    def get(self, handler: str) -> Runtime:
        """A usable runtime for the handler; unknown is INVALID_ARGUMENT, unusable FAILED_PRECONDITION."""
        name = self.name(handler)
        rt = self._by_name.get(name)
        if rt is None:
            known = ", ".join(sorted(self._by_name))
            raise errors.InvalidArgument(f"runtime_handler {name!r} is not configured; known handlers: {known}")
        ok, why = rt.available()
        if not ok:
            raise errors.FailedPrecondition(f"runtime handler {name!r} is not usable: {why}")
        return rt

    def configured(self, handler: str) -> Runtime:
        """The handler's runtime whether usable or not (a pod's cleanup, its log rotation, its stats); a name
        no longer in the config gets the unavailable runtime, which refuses every operation."""
        name = self.name(handler)
        rt = self._by_name.get(name)
        if rt is None:
            return UnavailableRuntime(HandlerConfig(name=name), "it is not in the configuration any more")
        return rt

    def sampler_for(self, handler: str) -> Sampler | None:
        """A runtime's own per-container stats sampler (runsc), or None where cgroups tell the story."""
        return self.configured(handler).stats_sampler()

    def reports(self) -> list[tuple[str, bool, str, bool, bool]]:
        """(name, available, reason, user namespaces, recursive read-only mounts) per handler."""
        out = []
        for name, rt in self._by_name.items():
            ok, why = rt.available()
            out.append((name, ok, why, rt.supports_user_namespaces, ok and rt.recursive_read_only_mounts()))
        return out

    async def probe(self) -> None:
        """Runs each handler's one-time probes (runtime version, features) off the event loop."""
        await asyncio.to_thread(self.reports)

    async def stop_zygote(self) -> None:
        await self.zygote.stop()
