"""The Runtime interface: everything shimd asks of a runtime handler, and nothing is looked up beside it.

A runtime is the daemon side of one configured handler (`[handlers.NAME]` in the config): it knows how
to start the pod's shim, what to pass that shim, and what the handler can and cannot do. One class per
kind (shimd/runtimes/runc.py, runsc.py, shimv2.py), picked by `HandlerConfig.driver` in
shimd/runtimes/registry.py. Adding one: docs/adding-a-runtime.md.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from shimd import errors, log
from shimd.config import HandlerConfig

if TYPE_CHECKING:
    from shimd.shimmgr.zygote import ZygoteSlot
    from shimd.stats.cgroupfs import Sample

# The containerd namespace shimd's shims run in (a shim v2 binary keys its state by it).
NAMESPACE = "k8s.io"
# One container's usage as the runtime itself accounts it (container id -> sample, None if unknown)
Sampler = Callable[[str], Awaitable["Sample | None"]]


class Runtime(abc.ABC):
    """One runtime handler as shimd drives it. Every capability is a member here, and every kind answers each."""

    handler: HandlerConfig

    # --- what the handler can do ---------------------------------------------------------------
    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """(usable, why): the binary is there and answers; the text is a version line or what is wrong.

        Synchronous and possibly slow the first time (it runs the binary): shimd calls it once in a thread at
        start-up (Runtimes.probe), after which implementations answer from a cache.
        """

    @property
    @abc.abstractmethod
    def supports_user_namespaces(self) -> bool:
        """Pods with their own user namespace (hostUsers: false) can run on it; else RunPodSandbox refuses."""

    @property
    @abc.abstractmethod
    def follows_log_rotation(self) -> bool:
        """Its log writer notices a renamed log file by itself, so ReopenContainerLog has nothing to ask the shim."""

    @abc.abstractmethod
    def recursive_read_only_mounts(self) -> bool:
        """Whether it honours CRI Mount.recursive_read_only ("rro"); CreateContainer refuses such mounts if not."""

    # --- the pod's shim --------------------------------------------------------------------------
    @abc.abstractmethod
    async def launch(self, pod_id: str, bundle: Path) -> str:
        """Start the pod's shim with `bundle` (the pod directory) as its working directory; its ttrpc address.

        How is the runtime's business: shimd's own shims are spawned on a socket shimd binds (forked by the
        zygote when there is one), a shim v2 binary is run with `start` the way containerd does it.
        """

    @abc.abstractmethod
    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        """Whether the pod needs a sandbox (pause) task in its shim; shared_pid: the pod shares one PID namespace."""

    @property
    @abc.abstractmethod
    def sandbox_task_needs_network(self) -> bool:
        """Whether the sandbox task may only start once CNI ADD has configured the netns (a VM or a gVisor
        sandbox copies its interfaces at boot); False lets RunPodSandbox start it alongside CNI ADD."""

    @abc.abstractmethod
    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]:
        """stdin, stdout, stderr URIs of a task's CreateTaskRequest for a container logging to log_path."""

    @abc.abstractmethod
    def runtime_options(self) -> Any:
        """The `options` Any of a CreateTaskRequest (the OCI runtime's binary, root, cgroup driver), or None."""

    @abc.abstractmethod
    def stats_sampler(self) -> Sampler | None:
        """The runtime's own per-container stats; None: the container's cgroup tells the story."""

    @abc.abstractmethod
    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None:
        """What a shim that died could not clean up itself: the OCI runtime's state, the rootfs mounts."""


class RuntimeBase(Runtime):
    """What every concrete runtime holds, and the cached availability probe they share."""

    log_name = "runtime"

    def __init__(self, handler: HandlerConfig, state_dir: Path, systemd_cgroup: bool = False,
                 runtime_timeout: float = 60.0, shimd_address: str = "", zygote: ZygoteSlot | None = None) -> None:
        self.handler = handler
        self.state_dir = state_dir
        self.systemd_cgroup = systemd_cgroup
        self.runtime_timeout = runtime_timeout
        # shimd's own address, given to shims (containerd's -address flag; shimd serves no events on it).
        self.shimd_address = shimd_address
        # Where shims' sockets live (short: unix socket paths are limited to 108 bytes).
        self.shim_dir = str(state_dir / "s")
        self.zygote = zygote
        self.root = handler.root or str(state_dir / handler.name)
        self._available: tuple[bool, str] | None = None
        self.log = log.get(self.log_name, handler=handler.name)

    def available(self) -> tuple[bool, str]:
        """Probed until it succeeds, then cached (Status asks on every call)."""
        if self._available is None or not self._available[0]:
            self._available = self._probe()
        return self._available

    @abc.abstractmethod
    def _probe(self) -> tuple[bool, str]: ...


class UnavailableRuntime(Runtime):
    """Stands in for a runtime that cannot be made, so one bad handler never breaks the others.

    Every operation is refused with FAILED_PRECONDITION saying why; every capability is off.
    """

    def __init__(self, handler: HandlerConfig, why: str) -> None:
        self.handler = handler
        self.why = why

    def _refuse(self) -> NoReturn:
        raise errors.FailedPrecondition(f"runtime handler {self.handler.name!r} is not usable: {self.why}")

    def available(self) -> tuple[bool, str]:
        return False, self.why

    @property
    def supports_user_namespaces(self) -> bool:
        return False

    @property
    def follows_log_rotation(self) -> bool:
        return False

    def recursive_read_only_mounts(self) -> bool:
        return False

    def stats_sampler(self) -> Sampler | None:
        return None

    async def launch(self, pod_id: str, bundle: Path) -> str:
        self._refuse()

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        self._refuse()

    @property
    def sandbox_task_needs_network(self) -> bool:
        return True

    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]:
        self._refuse()

    def runtime_options(self) -> Any:
        self._refuse()

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None:
        self._refuse()
