"""shimd's driver for gVisor (runsc) handlers.

The shim is the runc shim running runsc (SHIMD_RUNTIME_FLAVOR=runsc) with the handler's global
flags. Every pod is one gVisor sandbox: the pause task creates it (container-type "sandbox"), each
container joins it through the CRI annotations shimd/oci/spec.py writes.

`network = "host"` means gVisor uses the network stack of the namespace it runs in, which is the pod's
own netns (runsc joins the netns path of the spec), so the pod keeps its CNI address.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

from shimd.config import HandlerConfig
from shimd.shimmgr.drivers import Sampler
from shimd.stats.cgroupfs import Sample
from shims.runc.driver import VERSION_TIMEOUT, RuncDriver
from shims.runsc import stats


def global_flags(handler: HandlerConfig) -> list[str]:
    """runsc's global flags for this handler (before the subcommand, on every runsc call)."""
    flags = [f"--platform={handler.platform}", f"--network={handler.network}",
             f"--overlay2={'root:memory' if handler.overlay else 'none'}"]
    if handler.debug_log_dir:
        # A trailing '/' makes runsc create one file per command inside the directory.
        flags += ["--debug", f"--debug-log={handler.debug_log_dir.rstrip('/')}/"]
    return flags + list(handler.extra_args)


class RunscDriver(RuncDriver):
    log_name = "runsc_driver"
    # gVisor has no support for a host user namespace around its sandbox here: such pods are refused.
    supports_user_namespaces = False

    def __init__(self, handler: HandlerConfig, state_dir: Path, systemd_cgroup: bool = False,
                 runtime_timeout: float = 60.0) -> None:
        super().__init__(handler, state_dir, systemd_cgroup, runtime_timeout)
        self.flags = global_flags(handler)

    def _probe(self) -> tuple[bool, str]:
        ok, version = super()._probe()
        if not ok:
            return ok, version
        binary = shutil.which(self.handler.binary) or self.handler.binary
        try:
            # Once per handler at start-up (cached by available()), from a synchronous interface.
            out = subprocess.run([binary, "help", "platforms"], capture_output=True, text=True,
                                 timeout=VERSION_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"{binary} help platforms failed: {e}"
        platforms = [p.strip() for p in out.stdout.splitlines() if p.strip()]
        if platforms and self.handler.platform not in platforms:
            return False, (f"platform {self.handler.platform!r} is not supported by {version} (it has "
                           f"{', '.join(platforms)}): set handlers.{self.handler.name}.platform")
        if self.handler.debug_log_dir:
            with contextlib.suppress(OSError):
                Path(self.handler.debug_log_dir).mkdir(parents=True, exist_ok=True)
        return True, f"{version} (platform {self.handler.platform}, network {self.handler.network})"

    def recursive_read_only_mounts(self) -> bool:
        # runsc has no `features` command to show it honours "rro" (its gofer serves the mounts): off.
        return False

    def runtime_argv(self) -> list[str]:
        """runsc with this handler's root and global flags, as the shim runs it."""
        argv = [self.handler.binary, "--root", self.root, *self.flags]
        return [*argv, "--systemd-cgroup"] if self.systemd_cgroup else argv

    def stats_sampler(self) -> Sampler:
        return self.container_sample

    async def container_sample(self, container_id: str) -> Sample | None:
        """What the sandbox accounts to one container (its own cgroup is empty under gVisor)."""
        return await stats.sample(self.runtime_argv(), container_id, min(self.runtime_timeout, 10.0))

    def shim_env(self) -> dict[str, str]:
        return {"SHIMD_RUNTIME_FLAVOR": "runsc", "SHIMD_RUNTIME_ARGS": json.dumps(self.flags)}

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        # The pause task is the gVisor sandbox itself; containers join it.
        return True
