"""The runsc runtime: gVisor handlers (driver = "runsc").

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
import time
from pathlib import Path
from typing import Any

from shimd.config import HandlerConfig
from shimd.runtimes.base import Sampler
from shimd.runtimes.runc import VERSION_TIMEOUT, RuncRuntime
from shimd.stats.cgroupfs import Sample


def global_flags(handler: HandlerConfig) -> list[str]:
    """runsc's global flags for this handler (before the subcommand, on every runsc call)."""
    flags = [f"--platform={handler.platform}", f"--network={handler.network}",
             f"--overlay2={'root:memory' if handler.overlay else 'none'}"]
    if handler.debug_log_dir:
        # A trailing '/' makes runsc create one file per command inside the directory.
        flags += ["--debug", f"--debug-log={handler.debug_log_dir.rstrip('/')}/"]
    return flags + list(handler.extra_args)


class RunscRuntime(RuncRuntime):
    log_name = "runsc_runtime"

    def __init__(self, handler: HandlerConfig, state_dir: Path, **kwargs: Any) -> None:
        super().__init__(handler, state_dir, **kwargs)
        self.flags = global_flags(handler)

    @property
    def supports_user_namespaces(self) -> bool:
        # gVisor has no support for a host user namespace around its sandbox here: such pods are refused.
        return False

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
        return await sample(self.runtime_argv(), container_id, min(self.runtime_timeout, 10.0))

    def shim_env(self) -> dict[str, str]:
        return {"SHIMD_RUNTIME_FLAVOR": "runsc", "SHIMD_RUNTIME_ARGS": json.dumps(self.flags)}

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        # The pause task is the gVisor sandbox itself; containers join it.
        return True

    @property
    def sandbox_task_needs_network(self) -> bool:
        # The sandbox copies the netns's interfaces and routes into its netstack when it boots.
        return True


# --- stats: with gVisor, the whole sandbox sits in the pod's sandbox cgroup and a container's own cgroup
# stays empty, so only the sandbox (`runsc events --stats`) can say what a container uses.

def _int(d: Any, *path: str) -> int | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return int(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


def parse_events(raw: bytes, now_ns: int | None = None) -> Sample | None:
    """One JSON event line of `runsc events --stats` as a Sample; None when it carries no stats."""
    line = raw.strip().splitlines()[0] if raw.strip() else b""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    data = event.get("data") if isinstance(event, dict) else None
    if event.get("type") != "stats" or not isinstance(data, dict):
        return None
    usage = _int(data, "memory", "usage", "usage")
    limit = _int(data, "memory", "usage", "limit")
    cache = _int(data, "memory", "cache")
    working_set = None if usage is None else max(0, usage - (_int(data, "memory", "raw", "total_inactive_file") or 0))
    return Sample(
        timestamp_ns=now_ns or time.time_ns(),
        cpu_usage_ns=_int(data, "cpu", "usage", "total"),
        memory_usage=usage,
        working_set=working_set,
        rss=_int(data, "memory", "raw", "total_rss") or _int(data, "memory", "raw", "rss"),
        cache=cache,
        memory_limit=limit if limit else None,  # runsc reports 0 for "no limit"
        swap_usage=_int(data, "memory", "swap", "usage"),
        pids=_int(data, "pids", "current"),
    )


KILL_WAIT_SECONDS = 5.0


async def sample(argv: list[str], container_id: str, timeout: float) -> Sample | None:
    """Run `<runsc and global flags> events --stats <id>`; None when the container is gone or runsc fails."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, "events", "--stats", container_id,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return None
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # Bounded too: a runsc stuck in the kernel is reaped by the loop's child watcher when it exits.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_SECONDS):
                await proc.wait()
        return None
    return parse_events(out) if proc.returncode == 0 and out else None
