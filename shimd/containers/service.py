"""Container lifecycle: spec and writable layer at create, the shim task at start, exits, removal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import betterproto
import betterproto.lib.google.protobuf as pbany

from shimd import cgroups, errors, events, fsutil, log, mounts
from shimd.api.runtime import v1 as cri
from shimd.containers import image_volumes
from shimd.network import namespaces
from shimd.oci import spec as ocispec
from shimd.pods.context import pod_context
from shimd.shimmgr.manager import ExitInfo, ts_ns
from shimd.store.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_READY,
    ContainerRecord,
    PodRecord,
    config_field,
)
from shims.common import idmap

if TYPE_CHECKING:
    from shimd.images.manager import ImageManager
    from shimd.shimmgr.manager import ShimManager
    from shimd.store.store import Store

# How the runc shim (and containerd's) recognise an Update payload: OCI LinuxResources as JSON.
OCI_RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

STDIN_FIFO = "stdin"
# After SIGKILL a task normally exits within milliseconds; past this something is badly wrong.
KILL_GRACE = 10.0


def _signal_number(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    return int(getattr(signal, name, signal.SIGTERM))


class ContainerService:
    def __init__(self, *, cgroup_driver: str, root_dir: Path, state_dir: Path, store: Store, shims: ShimManager,
                 images: ImageManager, bus: events.EventBus) -> None:
        self.cgroup_driver = cgroup_driver
        self.rw_dir = root_dir / "rw"
        self.state_dir = state_dir
        self.bundle_dir = state_dir / "containers"
        self.store = store
        self.shims = shims
        self.images = images
        self.bus = bus
        self._exited: dict[str, asyncio.Event] = {}
        self.log = log.get("containers")

    def _exit_event(self, cid: str) -> asyncio.Event:
        return self._exited.setdefault(cid, asyncio.Event())

    # --- create ------------------------------------------------------------------------------
    async def create(self, pod_id: str, config: cri.ContainerConfig) -> str:
        pod = self.store.pod(pod_id)
        image_volumes.check_config(config)
        async with self.store.lock(pod.id):
            if pod.state != POD_READY:
                raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready (state {pod.state})")
            image = self.images.get(config.image.image)
            if image is None:
                raise errors.NotFound(f"image.image {config.image.image!r} not found: pull it first")
            volumes = self._image_volumes(config)
            log_path = _log_path(config_field(pod.config, "logDirectory", default=""), config.log_path)
            cid = secrets.token_hex(32)
            ctr = ContainerRecord(
                id=cid, pod_id=pod.id, name=config.metadata.name, attempt=config.metadata.attempt,
                created_at=time.time_ns(), config=config.to_dict(), image_ref=config.image.image,
                image_id=image.id, log_path=log_path, bundle=str(self.bundle_dir / cid),
                labels=dict(config.labels), annotations=dict(config.annotations), tty=config.tty,
                stdin=config.stdin, fs_dir=str(self.rw_dir / cid),
                mounts=[_mount_record(m, volumes.get(i)) for i, m in enumerate(config.mounts)],
            )
            self.store.reserve_name(ctr.name_key(pod), cid, "container")
            try:
                ctx = pod_context(pod, self.state_dir)
                ctx.cgroups_path = cgroups.container_path(self.cgroup_driver, pod.cgroup_parent, cid)
                img_ctx = ocispec.ImageContext(name=image.repo_tags[0] if image.repo_tags else image.id,
                                               config=dict(image.config.get("config") or {}), layers=image.layers)
                bundle = Path(ctr.bundle)
                planned = {v.index: str(image_volumes.mount_point(bundle, v.index)) for v in volumes.values()}
                # In a thread: it reads the image's /etc/passwd and /etc/group.
                spec = await asyncio.to_thread(ocispec.container_spec, cid, config, ctx, img_ctx,
                                               str(bundle / "rootfs"), image_sources=planned)
                if ctx.userns is not None:
                    await mounts.check_idmap(image.layers, pod.namespaces[namespaces.USER])
                await asyncio.to_thread(self._prepare_dirs, ctr, config, ctx.userns)
                await asyncio.to_thread(mounts.check_propagation_sync, [
                    (i, m.host_path, int(m.propagation)) for i, m in enumerate(config.mounts) if i not in volumes])
                for v in volumes.values():
                    source = await image_volumes.mount(bundle, v, f"mounts[{v.index}]")
                    _set_mount_source(spec, planned[v.index], source)
                await fsutil.write_json(bundle / "config.json", spec)
                await self.store.save_container(ctr)
            except BaseException:
                self.store.release_name(ctr.name_key(pod), cid)
                await self._remove_files(ctr)
                raise
        self.bus.publish(events.CREATED, cid, pod.id)
        self.log.info("container created", pod_id=pod.id, container_id=cid, name=ctr.name)
        return cid

    def _image_volumes(self, config: cri.ContainerConfig) -> dict[int, image_volumes.Volume]:
        """The config's image volumes by mount index; each image must have been pulled."""
        out = {}
        for i, m in enumerate(config.mounts):
            if not ocispec.is_image_mount(m):
                continue
            img = self.images.get(m.image.image)
            if img is None:
                raise errors.NotFound(f"mounts[{i}].image.image {m.image.image!r} not found: pull it first")
            out[i] = image_volumes.Volume(i, img.id, list(img.layers), m.image_sub_path)
        return out

    async def _mount_image_volumes(self, ctr: ContainerRecord) -> None:
        """Mount again what a reboot (or a crash inside CreateContainer) took away; a no-op otherwise."""
        for i, m in enumerate(ctr.mounts):
            image_id = m.get("image_id")
            if not image_id:
                continue
            img = self.images.get(image_id)
            if img is None:
                raise errors.FailedPrecondition(f"mounts[{i}].image {image_id} of container {ctr.id} was removed")
            await image_volumes.mount(Path(ctr.bundle), image_volumes.Volume(i, img.id, list(img.layers),
                                                                              m.get("image_sub_path") or ""),
                                      f"mounts[{i}]")

    @staticmethod
    def _prepare_dirs(ctr: ContainerRecord, config: cri.ContainerConfig, userns: ocispec.IdMappings | None) -> None:
        fs = Path(ctr.fs_dir)
        (fs / "upper").mkdir(parents=True, exist_ok=True)
        (fs / "work").mkdir(parents=True, exist_ok=True)
        root = userns.host_root() if userns is not None else None
        if root is not None:
            # Only the lower layers are idmapped: the rootfs' own directory is the upper one's, and
            # files the container writes land there as their host ids (as with containerd 2).
            os.chown(fs / "upper", *root)
        (Path(ctr.bundle) / "rootfs").mkdir(parents=True, exist_ok=True)
        if ctr.log_path:
            Path(ctr.log_path).parent.mkdir(parents=True, exist_ok=True)
        for m in config.mounts:
            # As containerd does: a missing host path becomes a directory.
            if m.host_path and not ocispec.is_image_mount(m) and not os.path.exists(m.host_path):
                os.makedirs(m.host_path, exist_ok=True)

    # --- start -------------------------------------------------------------------------------
    async def start(self, cid: str) -> None:
        ctr = self.store.container(cid)
        pod = self.store.pod(ctr.pod_id)
        async with self.store.lock(pod.id):
            if ctr.state != CONTAINER_CREATED:
                raise errors.FailedPrecondition(f"container {ctr.id} is {ctr.state}, not CREATED")
            if pod.state != POD_READY:
                raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready")
            image = self.images.get(ctr.image_id)
            if image is None:
                raise errors.FailedPrecondition(f"image {ctr.image_id} of container {ctr.id} was removed")
            await self._mount_image_volumes(ctr)
            lg = self.log.bind(pod_id=pod.id, container_id=ctr.id, handler=pod.handler)
            drv = self.shims.driver(pod.handler)
            stdin_fifo = await asyncio.to_thread(_make_stdin_fifo, Path(ctr.bundle)) if ctr.stdin else ""
            stdio = drv.log_stdio(ctr.log_path, stdin_fifo)
            options = [f"lowerdir={':'.join(image.layers)}", f"upperdir={ctr.fs_dir}/upper",
                       f"workdir={ctr.fs_dir}/work"]
            if namespaces.USER in pod.namespaces:
                # The shim mounts the overlay on lower layers idmapped with this user namespace.
                options.append(idmap.USERNS_MOUNT_OPTION + pod.namespaces[namespaces.USER])
            rootfs = [{"type": "overlay", "source": "overlay", "options": options}]
            self._exited.pop(ctr.id, None)
            try:
                ctr.pid = await self.shims.create(pod.id, pod.handler, ctr.id, Path(ctr.bundle), rootfs, stdio,
                                                  ctr.tty)
                # Taken before Start: a fast process can exit before Start even returns.
                started_at = time.time_ns()
                await self.shims.start(pod.id, ctr.id)
            except errors.ShimdError as e:
                ctr.state, ctr.reason, ctr.message = CONTAINER_EXITED, "StartError", str(e)
                ctr.exit_code, ctr.finished_at = 128, time.time_ns()
                await self.store.save_container(ctr)
                with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                    await self.shims.delete(pod.id, ctr.id)
                lg.warning("container failed to start", error=str(e))
                raise
            ctr.state, ctr.started_at = CONTAINER_RUNNING, started_at
            await self.store.save_container(ctr)
            self.shims.watch(pod.id, ctr.id)
            self.bus.publish(events.STARTED, ctr.id, pod.id)
            lg.info("container started", pid=ctr.pid)

    # --- exits -------------------------------------------------------------------------------
    async def on_exit(self, pod_id: str, task_id: str, info: ExitInfo) -> None:
        """Called by the exit watcher; records the exit durably, then frees the task in the shim."""
        ctr = self.store.containers.get(task_id)
        if ctr is None:
            return
        lg = self.log.bind(pod_id=pod_id, container_id=task_id)
        if ctr.state == CONTAINER_RUNNING:
            oom = await asyncio.to_thread(cgroups.oom_killed, ctr_cgroup(self.cgroup_driver, self.store, ctr))
            ctr.state = CONTAINER_EXITED
            ctr.exit_code = info.exit_status
            ctr.finished_at = max(info.exited_at_ns or time.time_ns(), ctr.started_at)
            ctr.reason = "OOMKilled" if oom else ("Completed" if info.exit_status == 0 else "Error")
            await self.store.save_container(ctr)
            self.bus.publish(events.STOPPED, ctr.id, pod_id)
            lg.info("container exited", exit_code=info.exit_status, reason=ctr.reason)
        try:
            await self.shims.delete(pod_id, task_id)
        except errors.NotFound:
            pass
        except (TimeoutError, errors.ShimdError, OSError) as e:
            lg.warning("deleting the exited task failed", error=str(e))
        if ctr.state == CONTAINER_EXITED:
            # Nothing uses the image volumes of an exited container any more (it never runs again).
            try:
                await image_volumes.unmount_all(Path(ctr.bundle))
            except (errors.ShimdError, OSError) as e:
                lg.warning("unmounting image volumes failed", error=str(e))
        self._exit_event(task_id).set()

    async def mark_lost(self, ctr: ContainerRecord, reason: str, message: str) -> None:
        if ctr.state != CONTAINER_RUNNING:
            return
        ctr.state, ctr.reason, ctr.message = CONTAINER_EXITED, reason, message
        ctr.exit_code, ctr.finished_at = 255, time.time_ns()
        await self.store.save_container(ctr)
        self.bus.publish(events.STOPPED, ctr.id, ctr.pod_id)
        self._exit_event(ctr.id).set()

    async def _wait_exit(self, ctr: ContainerRecord, timeout: float) -> bool:
        if ctr.state != CONTAINER_RUNNING:
            return True
        try:
            await asyncio.wait_for(self._exit_event(ctr.id).wait(), timeout)
            return True
        except TimeoutError:
            return ctr.state != CONTAINER_RUNNING

    # --- stop / remove -----------------------------------------------------------------------
    async def stop(self, cid: str, timeout: int) -> None:
        ctr = self.store.container(cid)
        await self._stop(ctr, timeout)

    async def _stop(self, ctr: ContainerRecord, timeout: float) -> None:
        if ctr.state != CONTAINER_RUNNING:
            return
        pod = self.store.pod(ctr.pod_id)
        if pod.shim_dead:
            await self.mark_lost(ctr, "ShimDied", f"the shim of pod sandbox {pod.id} exited")
            return
        self.shims.watch(pod.id, ctr.id)
        lg = self.log.bind(pod_id=pod.id, container_id=ctr.id)
        if timeout > 0:
            config = cri.ContainerConfig().from_dict(ctr.config)
            sig = self._stop_signal(ctr, config)
            with contextlib.suppress(errors.NotFound, errors.FailedPrecondition):
                await self.shims.kill(pod.id, ctr.id, sig)
            if await self._wait_exit(ctr, timeout):
                return
            lg.info("stop timeout passed, killing", timeout=timeout)
        with contextlib.suppress(errors.NotFound, errors.FailedPrecondition):
            await self.shims.kill(pod.id, ctr.id, signal.SIGKILL, all_processes=True)
        if not await self._wait_exit(ctr, KILL_GRACE):
            raise errors.DeadlineExceeded(f"container {ctr.id} did not exit {KILL_GRACE}s after SIGKILL")

    def _stop_signal(self, ctr: ContainerRecord, config: cri.ContainerConfig) -> int:
        if config.stop_signal and config.stop_signal != cri.Signal.RUNTIME_DEFAULT:
            return _signal_number(config.stop_signal.name)
        image = self.images.get(ctr.image_id)
        if image is not None:
            name = (image.config.get("config") or {}).get("StopSignal")
            if name:
                return _signal_number(str(name))
        return int(signal.SIGTERM)

    async def remove(self, cid: str) -> None:
        try:
            ctr = self.store.container(cid)
        except errors.NotFound:
            return  # CRI: removing a removed container is fine
        pod = self.store.pod(ctr.pod_id)
        async with self.store.lock(pod.id):
            await self._remove(ctr)

    async def _remove(self, ctr: ContainerRecord) -> None:
        await self._stop(ctr, 0)
        await self._remove_files(ctr)
        await self.store.delete_container(ctr)
        self._exited.pop(ctr.id, None)
        self.bus.publish(events.DELETED, ctr.id, ctr.pod_id)
        self.log.info("container removed", pod_id=ctr.pod_id, container_id=ctr.id)

    async def _remove_files(self, ctr: ContainerRecord) -> None:
        rootfs = Path(ctr.bundle) / "rootfs"
        # Before the tree is removed: never walk into the image store through a volume.
        await image_volumes.unmount_all(Path(ctr.bundle))
        with contextlib.suppress(errors.ShimdError):
            await mounts.unmount(rootfs)
        await fsutil.remove_tree(Path(ctr.bundle))
        await fsutil.remove_tree(Path(ctr.fs_dir))

    async def stop_all(self, pod: PodRecord) -> None:
        ctrs = [c for c in self.store.pod_containers(pod.id) if c.state == CONTAINER_RUNNING]
        results = await asyncio.gather(*(self._stop(c, 0) for c in ctrs), return_exceptions=True)
        for c, r in zip(ctrs, results, strict=True):
            if isinstance(r, BaseException):
                self.log.warning("stopping container failed", pod_id=pod.id, container_id=c.id, error=str(r))
                await self.mark_lost(c, "Unknown", f"could not be stopped: {r}")

    async def remove_all(self, pod: PodRecord) -> None:
        for c in self.store.pod_containers(pod.id):
            await self._remove(c)

    # --- resources ---------------------------------------------------------------------------
    async def update_resources(self, cid: str, new: cri.LinuxContainerResources) -> None:
        """Apply live (runc update through the shim) and persist, so status and restarts see them."""
        ctr = self.store.container(cid)
        pod = self.store.pod(ctr.pod_id)
        async with self.store.lock(pod.id):
            config = cri.ContainerConfig().from_dict(ctr.config)
            old = config.linux.resources if betterproto.serialized_on_wire(config.linux) else None
            merged = ocispec.merge_resources(old, new)
            oci, _ = ocispec.resources(merged, ocispec.host_min_oom_score_adj())
            if ctr.state == CONTAINER_RUNNING:
                value = json.dumps(oci).encode()
                await self.shims.update(pod.id, ctr.id, pbany.Any(type_url=OCI_RESOURCES_TYPE, value=value))
            elif ctr.state == CONTAINER_CREATED:
                await self._patch_spec_resources(ctr, oci)
            else:
                raise errors.FailedPrecondition(f"container {ctr.id} is {ctr.state}; only created or running "
                                                "containers can be updated")
            config.linux.resources = merged
            ctr.config = config.to_dict()
            await self.store.save_container(ctr)
        self.log.info("container resources updated", pod_id=pod.id, container_id=ctr.id, resources=oci)

    @staticmethod
    async def _patch_spec_resources(ctr: ContainerRecord, oci: dict[str, Any]) -> None:
        path = Path(ctr.bundle) / "config.json"
        spec = json.loads(await asyncio.to_thread(path.read_bytes))
        res = spec.setdefault("linux", {}).setdefault("resources", {})
        for key, value in oci.items():
            res[key] = {**res.get(key, {}), **value} if isinstance(value, dict) else value
        await fsutil.write_json(path, spec)

    async def reopen_log(self, cid: str) -> None:
        ctr = self.store.container(cid)
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running")
        pod = self.store.pods.get(ctr.pod_id)
        drv = self.shims.drivers.get(pod.handler) if pod is not None else None
        if drv is not None and drv.follows_log_rotation:
            return  # that handler's log writer notices the rename by itself (shim v2 binaries have no Reopen)
        await self.shims.reopen_log(ctr.pod_id, ctr.id)

    # --- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Reattach to every running task; record exits that happened while shimd was down."""
        for ctr in list(self.store.containers.values()):
            if ctr.state == CONTAINER_CREATED:
                await self._recover_created(ctr)
                continue
            if ctr.state == CONTAINER_EXITED:
                await self._finish_exit(ctr)
                continue
            if ctr.state != CONTAINER_RUNNING:
                continue
            pod = self.store.pods.get(ctr.pod_id)
            if pod is None:
                continue
            if pod.shim_dead:
                await self.mark_lost(ctr, "ShimDied", f"the shim of pod sandbox {pod.id} exited")
                continue
            try:
                st = await self.shims.state(pod.id, ctr.id)
            except errors.NotFound:
                await self.mark_lost(ctr, "Unknown", "the task is gone from its shim")
                continue
            except (TimeoutError, errors.ShimdError, OSError) as e:
                self.log.warning("cannot reach shim during recovery", pod_id=pod.id, error=str(e))
                self.shims.watch(pod.id, ctr.id)
                continue
            # Status enum: 3 = STOPPED in containerd's task types.
            if int(st.status) == 3:
                await self.on_exit(pod.id, ctr.id, ExitInfo(int(st.exit_status), ts_ns(st.exited_at)))
            else:
                self.shims.watch(pod.id, ctr.id)

    async def _finish_exit(self, ctr: ContainerRecord) -> None:
        """A crash between recording an exit and deleting the task leaves the task (and its rootfs
        mount) in the shim; Delete is idempotent, so it is simply issued again."""
        pod = self.store.pods.get(ctr.pod_id)
        if pod is None or pod.shim_dead or not pod.shim_address:
            return
        try:
            await self.shims.delete(pod.id, ctr.id)
        except errors.NotFound:
            return
        except (TimeoutError, errors.ShimdError, OSError) as e:
            self.log.warning("cannot delete the task of an exited container", pod_id=pod.id, container_id=ctr.id,
                             error=str(e))
            return
        self.log.info("deleted the task of a container that exited before a crash", pod_id=pod.id,
                      container_id=ctr.id)

    async def _recover_created(self, ctr: ContainerRecord) -> None:
        """A crash inside StartContainer leaves the record CREATED while the shim may hold a task.

        The task is the truth: a running one is adopted, a stopped one's exit recorded; one that was
        created but never started is deleted, so a retried StartContainer can create it afresh.
        """
        pod = self.store.pods.get(ctr.pod_id)
        if pod is None or pod.shim_dead or not pod.shim_address:
            return
        lg = self.log.bind(pod_id=pod.id, container_id=ctr.id)
        try:
            st = await self.shims.state(pod.id, ctr.id)
        except errors.NotFound:
            return
        except (TimeoutError, errors.ShimdError, OSError) as e:
            lg.warning("cannot reach shim during recovery", error=str(e))
            return
        status = int(st.status)  # containerd task Status: 1 CREATED, 2 RUNNING, 3 STOPPED, 4 PAUSED
        if status == 1:
            lg.warning("deleting the task of an interrupted StartContainer")
            with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                await self.shims.delete(pod.id, ctr.id)
            return
        lg.warning("adopting the task of an interrupted StartContainer", status=status)
        ctr.state, ctr.pid, ctr.started_at = CONTAINER_RUNNING, int(st.pid), time.time_ns()
        await self.store.save_container(ctr)
        if status == 3:
            await self.on_exit(pod.id, ctr.id, ExitInfo(int(st.exit_status), ts_ns(st.exited_at)))
        else:
            self.shims.watch(pod.id, ctr.id)


def _make_stdin_fifo(bundle: Path) -> str:
    """The container's stdin for attach: the shim reads it; attached clients write to it."""
    path = bundle / STDIN_FIFO
    if not path.exists():
        os.mkfifo(path, 0o600)
    return str(path)


def _log_path(log_directory: str, log_path: str) -> str:
    """Pure string work (no filesystem access): the file must stay inside the pod's log directory."""
    if not (log_directory and log_path):
        return ""
    full = os.path.normpath(os.path.join(log_directory, log_path))
    if not full.startswith(os.path.normpath(log_directory) + "/"):
        raise errors.InvalidArgument(f"log_path {log_path!r} escapes the pod's log_directory")
    return full


def ctr_cgroup(driver: str, store: Store, ctr: ContainerRecord) -> str:
    pod = store.pods.get(ctr.pod_id)
    parent = pod.cgroup_parent if pod else ""
    return cgroups.relative_path(driver, cgroups.container_path(driver, parent, ctr.id))


def _mount_record(m: cri.Mount, vol: image_volumes.Volume | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"container_path": m.container_path, "host_path": m.host_path, "readonly": m.readonly,
                           "selinux_relabel": m.selinux_relabel, "propagation": int(m.propagation)}
    if vol is not None:
        rec.update(image=m.image.image, user_specified_image=m.image.user_specified_image, image_id=vol.image_id,
                   image_sub_path=m.image_sub_path)
    return rec


def _set_mount_source(spec: dict[str, Any], planned: str, source: str) -> None:
    """The image volume's bind source once its sub path is resolved inside the mounted image."""
    for entry in spec["mounts"]:
        if entry.get("source") == planned:
            entry["source"] = source
