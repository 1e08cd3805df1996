"""shimd's driver for gVisor (runsc) handlers.

The shim is the runc shim running runsc (SHIMD_RUNTIME_FLAVOR=runsc) with the handler's global
flags. Every pod is one gVisor sandbox: the pause task creates it (container-type "sandbox"), each
container joins it through the CRI annotations shimd/oci/spec.py writes.

`network = "host"` means gVisor uses the network stack of the namespace it runs in, which is the pod's
own netns (runsc joins the netns path of the spec), so the pod keeps its CNI address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from pathlib import Path

from shimd import log
from shimd.config import HandlerConfig
from shimd.stats.cgroupfs import Sample
from shims.runc.driver import VERSION_TIMEOUT, RuncDriver
from shims.runc.mounts import is_mountpoint, unmount
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
    supports_user_namespaces = False

    def __init__(self, handler: HandlerConfig, state_dir: Path, systemd_cgroup: bool = False,
                 runtime_timeout: float = 60.0) -> None:
        super().__init__(handler, state_dir, systemd_cgroup, runtime_timeout)
        self.flags = global_flags(handler)
        self.log = log.get("runsc_driver", handler=handler.name)

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

    def runtime_argv(self) -> list[str]:
        """runsc with this handler's root and global flags, as the shim runs it."""
        argv = [self.handler.binary, "--root", self.root, *self.flags]
        return [*argv, "--systemd-cgroup"] if self.systemd_cgroup else argv

    async def container_sample(self, container_id: str) -> Sample | None:
        """What the sandbox accounts to one container (its own cgroup is empty under gVisor)."""
        return await stats.sample(self.runtime_argv(), container_id, min(self.runtime_timeout, 10.0))

    def shim_env(self) -> dict[str, str]:
        return {"SHIMD_RUNTIME_FLAVOR": "runsc", "SHIMD_RUNTIME_ARGS": json.dumps(self.flags)}

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        # The pause task is the gVisor sandbox itself; containers join it.
        return True

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None:
        """Force-delete the pod's runsc containers (the sandbox, named like the pod, last) and unmount rootfs."""
        base = self.runtime_argv()
        for cid in container_ids:
            await self._delete(base, cid)
        for bundle in bundles:
            rootfs = str(bundle / "rootfs")
            try:
                if await asyncio.to_thread(is_mountpoint, rootfs):
                    await asyncio.to_thread(unmount, rootfs)
            except OSError as e:
                self.log.warning("unmounting rootfs failed", path=rootfs, error=str(e))

    async def _delete(self, base: list[str], cid: str) -> None:
        lg = self.log.bind(container_id=cid)
        try:
            proc = await asyncio.create_subprocess_exec(*base, "delete", "--force", cid,
                                                        stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            lg.warning("runsc delete failed to start", error=str(e))
            return
        try:
            async with asyncio.timeout(self.runtime_timeout):
                _, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            lg.warning("runsc delete timed out")
            return
        text = err.decode(errors="replace").strip()
        if proc.returncode != 0 and "does not exist" not in text and "not exist" not in text:
            lg.warning("runsc delete failed", error=text[:500])
