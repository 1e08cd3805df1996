"""The runc runtime (handlers with driver = "runc", runc or crun): shimd's own shim, spawned on a socket shimd
binds: the compiled one (shims/native) exec'd directly, or the Python one (shims/runc) forked by the shim
zygote when it answers (handler setting `shim`).

Runs inside shimd (so it may use betterproto); the shim process itself never imports this.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import betterproto.lib.google.protobuf as pb

from shimd import cgroups, errors, subproc
from shimd.api.containerd.runc import v1 as runc_options
from shimd.mounts import is_mount_sync, unmount
from shimd.runtimes.base import NAMESPACE, RuntimeBase, Sampler
from shimd.shimmgr.launcher import DirectLaunch, spawn_serving
from shimproto.messages import CONTAINER_TYPE_ANNOTATION as SANDBOX_TYPE_ANNOTATION
from shimproto.messages import RUNC_OPTIONS_TYPE_URL
from shimproto.paths import LISTEN_FD_ENV, socket_path

VERSION_TIMEOUT = 10.0
# runc applies "rro" with mount_setattr(2) and AT_RECURSIVE, which Linux has since 5.12.
RRO_MIN_KERNEL = (5, 12)
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_STAMP: list[str] = []
NATIVE_SHIM_NAME = "shimd-runc-shim"
# Where `make` builds it in a source tree; deploy/install.sh installs it on PATH.
NATIVE_SHIM_BUILT = os.path.join(PROJECT_ROOT, "shims", "native", "target", "release", NATIVE_SHIM_NAME)


def find_native_shim() -> str | None:
    """The compiled runc shim: $SHIMD_NATIVE_SHIM, else the source tree's build, else PATH; None if none."""
    explicit = os.environ.get("SHIMD_NATIVE_SHIM", "")
    for path in ([explicit] if explicit else [NATIVE_SHIM_BUILT, shutil.which(NATIVE_SHIM_NAME) or ""]):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _code_stamp() -> str:
    """Changes whenever the shim's code does (an upgrade): a zygote with older code is replaced."""
    if not _STAMP:
        root = Path(PROJECT_ROOT)
        parts = [sys.executable]
        # The shim runs shims/ and the protocol package it shares with shimd.
        for p in sorted([*(root / "shims").rglob("*.py"), *(root / "shimproto").rglob("*.py")]):
            st = p.stat()
            parts.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
        _STAMP.append(hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16])
    return _STAMP[0]


class RuncRuntime(RuntimeBase):
    log_name = "runc_runtime"

    @property
    def supports_user_namespaces(self) -> bool:
        # Pods with hostUsers: false: pinned user namespace, idmapped image layers (see shims/runc/mounts.py).
        return True

    @property
    def follows_log_rotation(self) -> bool:
        # The shim's log writer keeps its file open: ReopenContainerLog asks it to reopen.
        return False

    def stats_sampler(self) -> Sampler | None:
        return None

    @functools.cached_property
    def native_shim(self) -> str | None:
        """The compiled shim this handler's pods run under; None: the Python shim (looked up once)."""
        if self.handler.shim == "python" or self.handler.driver != "runc":
            return None
        path = find_native_shim()
        if path is None and self.handler.shim == "auto":
            self.log.warning("native shim not found; pods run under the Python shim (build it with `make`)",
                             looked_in=[NATIVE_SHIM_BUILT, "PATH"])
        return path

    def _probe(self) -> tuple[bool, str]:
        if self.handler.shim == "native" and self.native_shim is None:
            return False, (f"handler {self.handler.name!r} asks for the native shim and {NATIVE_SHIM_NAME} is not "
                           f"installed (not at {NATIVE_SHIM_BUILT} nor in PATH): build it with `make`")
        binary = shutil.which(self.handler.binary)
        if binary is None:
            return False, f"runtime binary {self.handler.binary!r} not found"
        try:
            # Runs once per handler at start-up (then cached), from a synchronous interface.
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"{binary} --version failed: {e}"
        if out.returncode != 0:
            return False, f"{binary} --version exited {out.returncode}: {out.stderr.strip()[:200]}"
        return True, out.stdout.splitlines()[0] if out.stdout else binary

    _rro: bool | None = None

    def recursive_read_only_mounts(self) -> bool:
        """True when `runc features` lists the "rro" mount option and the kernel can apply it.

        Asked once and cached (Status asks on every call); a failed probe is retried next time.
        """
        if self._rro is None:
            options = self._mount_options()
            if options is None:
                return False
            self._rro = "rro" in options and kernel_at_least(RRO_MIN_KERNEL)
        return self._rro

    def _mount_options(self) -> list[str] | None:
        binary = shutil.which(self.handler.binary)
        if binary is None:
            return None
        try:
            # Once per handler, like the version probe (shimd warms both in a thread at start-up).
            out = subprocess.run([binary, "features"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.log.warning("runtime features probe failed", error=str(e))
            return None
        if out.returncode != 0:
            # Runtimes older than runc 1.1 have no `features`: they cannot do rro either.
            return []
        try:
            options = json.loads(out.stdout).get("mountOptions") or []
        except (ValueError, AttributeError):
            return []
        return [str(o) for o in options]

    async def launch(self, pod_id: str, bundle: Path) -> str:
        # shimd's own shims skip the shim v2 `start` step: shimd binds their socket itself.
        native = self.native_shim
        if native is not None:
            # A compiled binary starts in about a millisecond: no zygote to fork it from.
            argv = [native, "-namespace", NAMESPACE, "-address", self.shimd_address, "-id", pod_id, "-detach",
                    "serve"]
            launch = DirectLaunch(argv=argv, env=self.shim_env(), listen_fd_env=LISTEN_FD_ENV, flags={},
                                  socket_path=socket_path(self.shim_dir, NAMESPACE, pod_id), detaches_itself=True)
            return await spawn_serving(launch, bundle=bundle, timeout=self.runtime_timeout)
        zygote = self.zygote.get(*self.zygote_argv()) if self.zygote is not None else None
        return await spawn_serving(self.direct_launch(NAMESPACE, pod_id, self.shimd_address, self.shim_dir),
                                   bundle=bundle, timeout=self.runtime_timeout, zygote=zygote)

    def direct_launch(self, namespace: str, pod_id: str, shimd_address: str, shim_dir: str) -> DirectLaunch:
        """How shimd starts this shim itself, skipping the shim v2 `start` step (an interpreter start-up)."""
        # -S -OO: no site-packages and no docstrings (less memory); the project is put on the path instead.
        argv = [sys.executable, "-S", "-OO", "-m", "shims.runc.shim", "-namespace", namespace, "-address",
                shimd_address, "-id", pod_id, "serve"]
        return DirectLaunch(argv=argv, env={**self.shim_env(), "PYTHONPATH": PROJECT_ROOT},
                            socket_path=socket_path(shim_dir, namespace, pod_id), listen_fd_env=LISTEN_FD_ENV,
                            flags={"namespace": namespace, "address": shimd_address, "id": pod_id})

    def zygote_argv(self) -> tuple[list[str], str, dict[str, str]]:
        """How to start the shim zygote: argv, the stamp of the shim code it must run, environment.

        Nothing handler-specific goes into its environment: each shim gets its own with the request.
        """
        return ([sys.executable, "-S", "-OO", "-m", "shims.runc.zygote"], _code_stamp(),
                {"PYTHONPATH": PROJECT_ROOT})

    def shim_env(self) -> dict[str, str]:
        # The shim bounds each runc command by this (daemon.runtime_timeout_seconds).
        return {"SHIMD_RUNTIME_TIMEOUT": f"{self.runtime_timeout:g}"}

    def runtime_options(self) -> pb.Any:
        opts = runc_options.Options(binary_name=self.handler.binary, root=self.root,
                                    systemd_cgroup=self.systemd_cgroup)
        return pb.Any(type_url=RUNC_OPTIONS_TYPE_URL, value=bytes(opts))

    def log_stdio(self, log_path: str, stdin_path: str) -> tuple[str, str, str]:
        """stdin, stdout, stderr URIs for a container logging to the CRI log file at log_path."""
        uri = f"crilog://{log_path}" if log_path else ""
        return stdin_path, uri, uri

    def needs_sandbox_task(self, shared_pid: bool) -> bool:
        # Namespaces are pinned by shimd itself; only a pod-wide PID namespace needs a process
        # (the pause/init task) to hold it.
        return shared_pid

    @property
    def sandbox_task_needs_network(self) -> bool:
        # catatonit only holds the PID namespace; it joins the pinned netns whatever is in it.
        return False

    def runtime_argv(self) -> list[str]:
        """The OCI runtime with this handler's root and global flags, as the shim runs it."""
        argv = [self.handler.binary, "--root", self.root]
        return [*argv, "--systemd-cgroup"] if self.systemd_cgroup else argv

    async def cleanup_after_dead_shim(self, container_ids: list[str], bundles: list[Path]) -> None:
        """Force-delete the containers of a dead shim, unmount their rootfs (no shell), and remove the
        cgroups of its pause task: the runc shim forks that one itself (shims/runc/pause.py), so runc never
        knew it and its delete removed nothing of it (for one runc ran, there is nothing left to remove)."""
        for cid in container_ids:
            await self._force_delete(cid)
        await unmount_rootfs(bundles, self.log)
        for bundle in bundles:
            cgroups_path = await asyncio.to_thread(_sandbox_cgroups_path, bundle / "config.json")
            if cgroups_path:
                driver = "systemd" if self.systemd_cgroup else "cgroupfs"
                left = await cgroups.remove(cgroups.relative_path(driver, cgroups_path))
                if left:
                    self.log.warning("the dead shim's pause task left cgroups", cgroups=left)

    async def _force_delete(self, cid: str) -> None:
        lg = self.log.bind(container_id=cid)
        name = Path(self.handler.binary).name
        try:
            done = await subproc.run([*self.runtime_argv(), "delete", "--force", cid], time_limit=self.runtime_timeout)
        except OSError as e:
            lg.warning(f"{name} delete failed to start", error=str(e))
            return
        except TimeoutError:
            lg.warning(f"{name} delete timed out")
            return
        text = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0 and "not exist" not in text:
            lg.warning(f"{name} delete failed", error=text[:500])


def _sandbox_cgroups_path(config: Path) -> str:
    """linux.cgroupsPath of a pod's sandbox (pause) task bundle's spec; "" for any other or none."""
    try:
        spec = json.loads(config.read_text())
        if spec.get("annotations", {}).get(SANDBOX_TYPE_ANNOTATION) != "sandbox":
            return ""
        path = spec.get("linux", {}).get("cgroupsPath", "")
        return path if isinstance(path, str) else ""
    except (OSError, ValueError, AttributeError):
        return ""


def kernel_at_least(version: tuple[int, int], release: str | None = None) -> bool:
    """Whether the running kernel (or the given uname release string) is at least major.minor."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= version


async def unmount_rootfs(bundles: list[Path], lg: Any) -> None:
    """Unmount what a dead shim left mounted at each bundle's rootfs."""
    for bundle in bundles:
        rootfs = bundle / "rootfs"
        try:
            if await asyncio.to_thread(is_mount_sync, rootfs):
                await unmount(rootfs)
        except (OSError, errors.ShimdError) as e:
            lg.warning("unmounting rootfs failed", path=rootfs, error=str(e))
