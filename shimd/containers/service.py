"""Container lifecycle: spec and writable layer at create, the shim task at start, exits, removal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import betterproto
import betterproto.lib.google.protobuf as pbany

from shimd import cgroups, errors, events, fsutil, log, mounts
from shimd.api import dicts
from shimd.api.runtime import v1 as cri
from shimd.containers import checkpoint as ckpt
from shimd.containers import image_volumes
from shimd.network import namespaces
from shimd.oci import spec as ocispec
from shimd.phases import phase, phase_context
from shimd.pods.context import mapped_root_gid, pod_context
from shimd.shimmgr.manager import ExitInfo, ts_ns
from shimd.store.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    ContainerRecord,
    PodRecord,
    config_field,
)
from shimproto import idmap
from shimproto.paths import attach_socket_path

if TYPE_CHECKING:
    from shimd.images.manager import ImageManager
    from shimd.shimmgr.manager import ShimManager
    from shimd.store.store import Store

# How the runc shim (and containerd's) recognise an Update payload: OCI LinuxResources as JSON.
OCI_RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

STDIN_FIFO = "stdin"
# A CRI timeout beyond this is taken as this: the shim bounds a CRIU dump by 10 minutes anyway.
MAX_CHECKPOINT_SECONDS = 3600
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
                 images: ImageManager, bus: events.EventBus, hugetlb: bool = True) -> None:
        self.cgroup_driver = cgroup_driver
        # Whether hugepage limits can be applied on this host (shimd.cgroups.hugetlb_usable); else left out.
        self.hugetlb = hugetlb
        self.rw_dir = root_dir / "rw"
        self.state_dir = state_dir
        self.bundle_dir = state_dir / "containers"
        self.shim_dir = state_dir / "s"  # where shimd's own shims listen (and serve attach sockets)
        # Unpacked checkpoint archives of containers to restore (kept until the container is removed),
        # and scratch space of CheckpointContainer (meaningless after a crash).
        self.restore_dir = root_dir / "checkpoints"
        self.checkpoint_work_dir = state_dir / "checkpoints"
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
        self._check_recursive_read_only(config, pod.handler)
        phase("request")  # decoding and the CRI validation, before the pod's lock is asked for
        async with self.store.lock(pod.id):
            phase("lock_wait")
            pod = self.store.pod(pod.id)
            if not pod.ready:
                raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready (state {pod.state})")
            archive = ""
            if ckpt.is_archive_ref(config.image.image):
                archive, config = config.image.image, await self._checkpoint_config(config)
            image = self.images.get(config.image.image)
            if image is None:
                raise errors.NotFound(f"image.image {config.image.image!r} not found: pull it first")
            volumes = self._image_volumes(config)
            log_path = _log_path(config_field(pod.config, "logDirectory", default=""), config.log_path)
            cid = secrets.token_hex(32)
            # Its user (from the spec below) is kept on the record: ContainerStatus reports it.
            ctr = ContainerRecord(
                id=cid, pod_id=pod.id, name=config.metadata.name, attempt=config.metadata.attempt,
                created_at=time.time_ns(), config=dicts.to_dict(config), image_ref=config.image.image,
                image_id=image.id, log_path=log_path, bundle=str(self.bundle_dir / cid),
                labels=dict(config.labels), annotations=dict(config.annotations), tty=config.tty,
                stdin=config.stdin, fs_dir=str(self.rw_dir / cid),
                mounts=[_mount_record(m, volumes.get(i)) for i, m in enumerate(config.mounts)],
                restore_from=str(self.restore_dir / cid / ckpt.CHECKPOINT_DIR) if archive else "",
            )
            self.store.reserve_name(ctr.name_key(pod), cid, "container")
            phase_context(pod_id=pod.id, container_id=cid)
            phase("validate")
            try:
                ctx = pod_context(pod, self.state_dir)
                ctx.cgroups_path = cgroups.container_path(self.cgroup_driver, pod.cgroup_parent, cid)
                img_ctx = ocispec.ImageContext(name=image.repo_tags[0] if image.repo_tags else image.id,
                                               config=dict(image.config.get("config") or {}), layers=image.layers)
                bundle = Path(ctr.bundle)
                planned = {v.index: str(image_volumes.mount_point(bundle, v.index)) for v in volumes.values()}
                propagations = [(i, m.host_path, int(m.propagation)) for i, m in enumerate(config.mounts)
                                if i not in volumes]

                def prepare() -> dict[str, Any]:
                    # One thread hop for the three (each hop costs on a busy loop): the spec reads the image's
                    # /etc/passwd and /etc/group, the others make directories and read mountinfo.
                    spec = ocispec.container_spec(cid, config, ctx, img_ctx, str(bundle / "rootfs"),
                                                  image_sources=planned, hugetlb=self.hugetlb)
                    phase("spec")
                    self._prepare_dirs(ctr, config, ctx.userns)
                    phase("dirs")
                    mounts.check_propagation_sync(propagations)
                    phase("propagation_check")
                    return spec

                spec = await asyncio.to_thread(prepare)
                if ctx.userns is not None:
                    await mounts.check_idmap(image.layers, pod.namespaces[namespaces.USER])
                    phase("idmap_check")
                for v in volumes.values():
                    source = await image_volumes.mount(bundle, v, f"mounts[{v.index}]")
                    _set_mount_source(spec, planned[v.index], source)
                    phase("image_volumes")
                if archive:
                    await asyncio.to_thread(ckpt.unpack_into, Path(archive), self.restore_dir / cid,
                                            Path(ctr.fs_dir) / "upper")
                await fsutil.write_json(bundle / "config.json", spec, durable=False)  # daemon.state: no fsync
                phase("bundle_write")
                ctr = dataclasses.replace(ctr, user=spec_user(spec))
                await self.store.add_container(ctr)
                phase("record_write")
            except BaseException:
                self.store.release_name(ctr.name_key(pod), cid)
                await self._remove_files(ctr)
                raise
        self.bus.publish(events.CREATED, cid, pod.id)
        self.log.info("container created", pod_id=pod.id, container_id=cid, name=ctr.name)
        return cid

    def _check_recursive_read_only(self, config: cri.ContainerConfig, handler: str) -> None:
        """A handler that cannot make submounts read-only must refuse rather than leave them writable."""
        for i, m in enumerate(config.mounts):
            if m.recursive_read_only and not self.shims.runtimes.get(handler).recursive_read_only_mounts():
                raise errors.InvalidArgument(f"config.mounts[{i}].recursive_read_only: runtime handler "
                                             f"{handler or 'default'!r} does not support recursive read-only mounts")

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

    async def _checkpoint_config(self, config: cri.ContainerConfig) -> cri.ContainerConfig:
        """As CRI-O does for an image that is a checkpoint archive: the container gets the checkpointed
        one's image and process, and this request's metadata, mounts and resources. The archive is
        unpacked (CRIU images, writable layer) once the container has a record, and StartContainer
        restores it from the CRIU images."""
        archive = config.image.image
        dump, spec = await asyncio.to_thread(ckpt.read_metadata, Path(archive))
        refs = ckpt.image_refs(dump)
        found = next((ref for ref in reversed(refs) if self.images.get(ref) is not None), "")
        if not found:
            missing = refs[0] if refs else "(not recorded in config.dump)"
            raise errors.NotFound(f"config.image.image {archive!r}: the checkpointed container's image "
                                  f"{missing!r} is not present: pull it first")
        process = spec.get("process") or {}
        config = cri.ContainerConfig().from_dict(config.to_dict())
        config.image = cri.ImageSpec(image=found)
        if isinstance(process.get("args"), list) and process["args"]:
            config.command, config.args = [str(a) for a in process["args"]], []
        if process.get("cwd"):
            config.working_dir = str(process["cwd"])
        config.tty = bool(process.get("terminal", False))
        self.log.info("creating a container from a checkpoint", archive=archive, image=found)
        return config

    @staticmethod
    def _prepare_dirs(ctr: ContainerRecord, config: cri.ContainerConfig, userns: ocispec.IdMappings | None) -> None:
        fs = Path(ctr.fs_dir)
        # overlayfs reaches upper and work with the mounter's (the shim's, root's) credentials: no one else
        # needs a way into the writable layer, a user-namespaced container included.
        fsutil.private_dir_sync(fs)
        (fs / "upper").mkdir(exist_ok=True)
        (fs / "work").mkdir(exist_ok=True)
        root = userns.host_root() if userns is not None else None
        if root is not None:
            # Only the lower layers are idmapped: the rootfs' own directory is the upper one's, and
            # files the container writes land there as their host ids (as with containerd 2).
            os.chown(fs / "upper", *root)
        # The bundle holds the rootfs mount; runc's init, as the pod's mapped root, must pass through it.
        fsutil.private_dir_sync(Path(ctr.bundle), root[1] if root is not None else None)
        (Path(ctr.bundle) / "rootfs").mkdir(exist_ok=True)
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
        phase_context(pod_id=pod.id, container_id=ctr.id)
        async with self.store.lock(pod.id):
            phase("lock_wait")
            ctr, pod = self.store.container(ctr.id), self.store.pod(pod.id)
            if ctr.state != CONTAINER_CREATED:
                raise errors.FailedPrecondition(f"container {ctr.id} is {ctr.state}, not CREATED")
            if not pod.ready:
                raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready")
            image = self.images.get(ctr.image_id)
            if image is None:
                raise errors.FailedPrecondition(f"image {ctr.image_id} of container {ctr.id} was removed")
            await self._mount_image_volumes(ctr)
            phase("image_volumes")
            lg = self.log.bind(pod_id=pod.id, container_id=ctr.id, handler=pod.handler)
            drv = self.shims.runtimes.get(pod.handler)
            stdin_fifo = await asyncio.to_thread(_make_stdin_fifo, Path(ctr.bundle)) if ctr.stdin else ""
            stdio = drv.log_stdio(ctr.log_path, stdin_fifo)
            options = [f"lowerdir={':'.join(image.layers)}", f"upperdir={ctr.fs_dir}/upper",
                       f"workdir={ctr.fs_dir}/work"]
            if namespaces.USER in pod.namespaces:
                # The shim mounts the overlay on lower layers idmapped with this user namespace.
                options.append(idmap.USERNS_MOUNT_OPTION + pod.namespaces[namespaces.USER])
            rootfs = [{"type": "overlay", "source": "overlay", "options": options}]
            self._exited.pop(ctr.id, None)
            phase("prepare")
            try:
                pid = await self.shims.create(pod.id, pod.handler, ctr.id, Path(ctr.bundle), rootfs, stdio,
                                              ctr.tty, checkpoint=ctr.restore_from)
                # The shim's Create: rootfs mount, then the OCI runtime's create (the runc shim runs the
                # process already: io.shimd.start-on-create).
                phase("runtime_create")
                # A fast process can exit before Start returns: its exit time is never put before this.
                started_at = time.time_ns()
                started_pid = await self.shims.start(pod.id, ctr.id)
                if ctr.restore_from:
                    pid = started_pid  # a restored process only exists once Start has run `runc restore`
                phase("runtime_start")
            except errors.ShimdError as e:
                await self.store.update_container(ctr.id, state=CONTAINER_EXITED, reason="StartError",
                                                  message=str(e), exit_code=128, finished_at=time.time_ns())
                with contextlib.suppress(errors.ShimdError, OSError, asyncio.TimeoutError):
                    await self.shims.delete(pod.id, ctr.id)
                lg.warning("container failed to start", error=str(e))
                raise
            await self.store.update_container(ctr.id, state=CONTAINER_RUNNING, pid=pid, started_at=started_at)
            phase("record_write")
            self.shims.watch(pod.id, ctr.id)
            self.bus.publish(events.STARTED, ctr.id, pod.id)
            lg.info("container started", pid=pid)

    # --- exits -------------------------------------------------------------------------------
    async def on_exit(self, pod_id: str, task_id: str, info: ExitInfo) -> None:
        """Called by the exit watcher; records the exit durably, then frees the task in the shim."""
        ctr = self.store.containers.get(task_id)
        if ctr is None:
            return
        lg = self.log.bind(pod_id=pod_id, container_id=task_id)
        if ctr.state == CONTAINER_RUNNING:
            oom = await asyncio.to_thread(cgroups.oom_killed, ctr_cgroup(self.cgroup_driver, self.store, ctr))
            reason = "OOMKilled" if oom else ("Completed" if info.exit_status == 0 else "Error")

            def exited(c: ContainerRecord) -> dict[str, Any] | None:
                if c.state != CONTAINER_RUNNING:
                    return None  # recorded meanwhile (by a racing stop that found the shim dead)
                return {"state": CONTAINER_EXITED, "exit_code": info.exit_status, "reason": reason,
                        "finished_at": max(info.exited_at_ns or time.time_ns(), c.started_at)}

            if await self._record_exit(task_id, exited):
                lg.info("container exited", exit_code=info.exit_status, reason=reason)
        ctr = self.store.containers.get(task_id) or ctr
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

    async def _record_exit(self, cid: str, change: Callable[[ContainerRecord], dict[str, Any] | None]) -> bool:
        """Records a running container's end (once: the first of the exit watcher, a stop that found the shim
        dead, recovery); True when this call recorded it."""
        recorded = False

        def once(c: ContainerRecord) -> dict[str, Any] | None:
            nonlocal recorded
            fields = change(c)
            recorded = fields is not None
            return fields

        new = await self.store.update_container(cid, once)
        if recorded and new is not None:
            self.bus.publish(events.STOPPED, cid, new.pod_id)
        return recorded

    async def mark_lost(self, cid: str, reason: str, message: str) -> None:
        """A running container whose task cannot be found or reached is recorded as exited (255)."""
        def lost(c: ContainerRecord) -> dict[str, Any] | None:
            if c.state != CONTAINER_RUNNING:
                return None
            return {"state": CONTAINER_EXITED, "reason": reason, "message": message, "exit_code": 255,
                    "finished_at": time.time_ns()}

        if await self._record_exit(cid, lost):
            self._exit_event(cid).set()

    def _running(self, cid: str) -> bool:
        ctr = self.store.containers.get(cid)
        return ctr is not None and ctr.state == CONTAINER_RUNNING

    async def _wait_exit(self, cid: str, timeout: float) -> bool:
        if not self._running(cid):
            return True
        try:
            await asyncio.wait_for(self._exit_event(cid).wait(), timeout)
            return True
        except TimeoutError:
            return not self._running(cid)

    # --- stop / remove -----------------------------------------------------------------------
    async def stop(self, cid: str, timeout: int) -> None:
        try:
            ctr = self.store.container(cid)
        except errors.NotFound:
            return  # CRI: stopping an unknown (already removed) container is fine, as with RemoveContainer
        await self._stop(ctr, timeout)

    async def _stop(self, ctr: ContainerRecord, timeout: float) -> None:
        if not self._running(ctr.id):
            return
        pod = self.store.pod(ctr.pod_id)
        if pod.shim_dead:
            await self.mark_lost(ctr.id, "ShimDied", f"the shim of pod sandbox {pod.id} exited")
            return
        self.shims.watch(pod.id, ctr.id)
        lg = self.log.bind(pod_id=pod.id, container_id=ctr.id)
        if timeout > 0:
            config = cri.ContainerConfig().from_dict(ctr.config)
            sig = self._stop_signal(ctr, config)
            with contextlib.suppress(errors.NotFound, errors.FailedPrecondition):
                await self.shims.kill(pod.id, ctr.id, sig)
            if await self._wait_exit(ctr.id, timeout):
                return
            lg.info("stop timeout passed, killing", timeout=timeout)
        with contextlib.suppress(errors.NotFound, errors.FailedPrecondition):
            await self.shims.kill(pod.id, ctr.id, signal.SIGKILL, all_processes=True)
        if not await self._wait_exit(ctr.id, KILL_GRACE):
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
        await self.store.delete_container(ctr.id)
        self._exited.pop(ctr.id, None)
        self.bus.publish(events.DELETED, ctr.id, ctr.pod_id)
        self.log.info("container removed", pod_id=ctr.pod_id, container_id=ctr.id)

    async def _remove_files(self, ctr: ContainerRecord) -> None:
        await asyncio.to_thread(self._remove_files_sync, ctr)  # one thread hop for all of it

    def _remove_files_sync(self, ctr: ContainerRecord) -> None:
        bundle = Path(ctr.bundle)
        # Before the tree is removed: never walk into the image store through a volume.
        image_volumes.unmount_all_sync(bundle)
        with contextlib.suppress(errors.ShimdError):
            mounts.unmount_sync(bundle / "rootfs")
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(ctr.fs_dir, ignore_errors=True)
        # The shim removes it when the container exits; one SIGKILLed before could not.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(attach_socket_path(str(self.shim_dir), ctr.id))
        if ctr.restore_from:
            shutil.rmtree(Path(ctr.restore_from).parent, ignore_errors=True)

    async def stop_all(self, pod: PodRecord) -> None:
        ctrs = [c for c in self.store.pod_containers(pod.id) if c.state == CONTAINER_RUNNING]
        results = await asyncio.gather(*(self._stop(c, 0) for c in ctrs), return_exceptions=True)
        for c, r in zip(ctrs, results, strict=True):
            if isinstance(r, BaseException):
                self.log.warning("stopping container failed", pod_id=pod.id, container_id=c.id, error=str(r))
                await self.mark_lost(c.id, "Unknown", f"could not be stopped: {r}")

    async def remove_all(self, pod: PodRecord) -> None:
        for c in self.store.pod_containers(pod.id):
            await self._remove(c)

    # --- resources ---------------------------------------------------------------------------
    async def update_resources(self, cid: str, new: cri.LinuxContainerResources) -> None:
        """Apply live (runc update through the shim) and persist, so status and restarts see them."""
        ctr = self.store.container(cid)
        pod = self.store.pod(ctr.pod_id)
        async with self.store.lock(pod.id):
            ctr = self.store.container(ctr.id)
            config = cri.ContainerConfig().from_dict(ctr.config)
            old = config.linux.resources if betterproto.serialized_on_wire(config.linux) else None
            merged = ocispec.merge_resources(old, new)
            oci, _ = ocispec.resources(merged, ocispec.host_min_oom_score_adj(), self.hugetlb)
            if ctr.state == CONTAINER_RUNNING:
                value = json.dumps(oci).encode()
                try:
                    await self.shims.update(pod.id, ctr.id, pbany.Any(type_url=OCI_RESOURCES_TYPE, value=value))
                except errors.NotFound:
                    # The task exited and was deleted while we were on our way: the container is not running.
                    raise errors.FailedPrecondition(f"container {ctr.id} has exited; only created or running "
                                                    "containers can be updated") from None
            elif ctr.state == CONTAINER_CREATED:
                await self._patch_spec_resources(ctr, oci)
            else:
                raise errors.FailedPrecondition(f"container {ctr.id} is {ctr.state}; only created or running "
                                                "containers can be updated")
            config.linux.resources = merged
            await self.store.update_container(ctr.id, config=dicts.to_dict(config))
        self.log.info("container resources updated", pod_id=pod.id, container_id=ctr.id, resources=oci)

    @staticmethod
    async def _patch_spec_resources(ctr: ContainerRecord, oci: dict[str, Any]) -> None:
        path = Path(ctr.bundle) / "config.json"
        spec = json.loads(await asyncio.to_thread(path.read_bytes))
        res = spec.setdefault("linux", {}).setdefault("resources", {})
        for key, value in oci.items():
            res[key] = {**res.get(key, {}), **value} if isinstance(value, dict) else value
        await fsutil.write_json(path, spec, durable=False)

    async def reopen_log(self, cid: str) -> None:
        ctr = self.store.container(cid)
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running")
        pod = self.store.pods.get(ctr.pod_id)
        drv = self.shims.runtimes.configured(pod.handler) if pod is not None else None
        if drv is not None and drv.follows_log_rotation:
            # That handler's log writer notices the rename by itself (shim v2 binaries have no Reopen), within
            # a second; the client expects the file now. The writer reopens by path, so it appends to this one.
            if ctr.log_path:
                await asyncio.to_thread(_create_log, ctr.log_path)
            return
        await self.shims.reopen_log(ctr.pod_id, ctr.id)

    # --- checkpoint --------------------------------------------------------------------------
    async def checkpoint(self, cid: str, location: str, timeout: int) -> None:
        """CheckpointContainer: CRIU images through the shim (the container keeps running, as with
        kubelet's checkpoint API), then the archive at `location` (see shimd/containers/checkpoint.py)."""
        ctr = self.store.container(cid)
        pod = self.store.pod(ctr.pod_id)
        async with self.store.lock(pod.id):
            ctr = self.store.container(ctr.id)
            if ctr.state != CONTAINER_RUNNING:
                raise errors.FailedPrecondition(f"container {ctr.id} is {ctr.state}; only a running container "
                                                "can be checkpointed")
            lg = self.log.bind(pod_id=pod.id, container_id=ctr.id, location=location)
            await asyncio.to_thread(ckpt.check_location, location)
            work = self.checkpoint_work_dir / f"{ctr.id[:12]}-{secrets.token_hex(4)}"
            images, criu_work = work / ckpt.CHECKPOINT_DIR, work / "work"
            await asyncio.to_thread(_make_private_dirs, images, criu_work)
            try:
                await self.shims.checkpoint(pod.id, ctr.id, images, criu_work, leave_running=True,
                                            timeout=min(timeout, MAX_CHECKPOINT_SECONDS))
                image = self.images.get(ctr.image_id)
                now = time.time_ns()
                config_dump = {
                    "id": ctr.id, "name": ctr.name, "rootfsImage": ctr.image_ref, "rootfsImageRef": ctr.image_id,
                    "rootfsImageName": image.repo_tags[0] if image and image.repo_tags else ctr.image_ref,
                    # The OCI runtime's name, as CRI-O records it (runc, crun).
                    "runtime": Path(self.shims.runtimes.get(pod.handler).handler.binary).name,
                    "createdTime": _rfc3339(ctr.created_at),
                    "checkpointedTime": _rfc3339(now),
                }
                await asyncio.to_thread(ckpt.write_archive, location, config_dump=config_dump,
                                        bundle=Path(ctr.bundle), images=images, work=criu_work,
                                        upper=Path(ctr.fs_dir) / "upper")
            finally:
                await fsutil.remove_tree(work)
        lg.info("container checkpointed")

    async def _remove_checkpoint_leftovers(self) -> None:
        """Scratch dirs of checkpoints cut short by a crash, and archives unpacked for containers that
        never got a record."""
        await fsutil.remove_tree(self.checkpoint_work_dir)

        def orphans() -> list[Path]:
            if not self.restore_dir.is_dir():
                return []
            return [p for p in self.restore_dir.iterdir() if p.name not in self.store.containers]

        for p in await asyncio.to_thread(orphans):
            await fsutil.remove_tree(p)

    # --- recovery ----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Reattach to every running task; record exits that happened while shimd was down."""
        await self._recover_unreadable()
        await asyncio.to_thread(self._secure_dirs, list(self.store.containers.values()))
        await self._remove_checkpoint_leftovers()
        await self._record_users()
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
                await self.mark_lost(ctr.id, "ShimDied", f"the shim of pod sandbox {pod.id} exited")
                continue
            try:
                st = await self.shims.state(pod.id, ctr.id)
            except errors.NotFound:
                await self.mark_lost(ctr.id, "Unknown", "the task is gone from its shim")
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

    async def _record_users(self) -> None:
        """Records of a shimd that read each container's user from its bundle at every status get it once."""
        for ctr in [c for c in self.store.containers.values() if not c.user and c.bundle]:
            user = await asyncio.to_thread(_bundle_user, Path(ctr.bundle))
            if user:
                await self.store.update_container(ctr.id, user=user)

    async def _recover_unreadable(self) -> None:
        """Containers whose record could not be parsed, or whose pod is gone: their task is stopped and their
        files removed. The pod comes from the bundle's config.json (the sandbox-id annotation)."""
        for cid in self.store.unreadable_containers:
            if cid in self.store.containers:
                continue
            bundle = self.bundle_dir / cid
            pod_id = await asyncio.to_thread(_bundle_pod_id, bundle)
            pod = self.store.pods.get(pod_id) if pod_id else None
            lg = self.log.bind(container_id=cid, pod_id=pod_id)
            if pod is None:
                lg.warning("removing the files of a container whose record is unreadable and pod unknown")
                await self._remove_files(self._stand_in(cid, pod_id))
                continue
            ctr = self._stand_in(cid, pod.id, running=bool(pod.shim_address and not pod.shim_dead))
            try:
                self.store.reserve_name(ctr.name_key(pod), cid, "container")
                await self.store.add_container(ctr)
                async with self.store.lock(pod.id):
                    await self._remove(ctr)
                lg.warning("stopped and removed a container whose record is unreadable")
            except (errors.ShimdError, OSError, TimeoutError) as e:
                lg.error("cleaning up a container whose record is unreadable failed", error=str(e))
        for ctr in list(self.store.orphans.values()):
            # Its pod's record is gone (it is deleted only after its containers): what is left is files.
            self.log.warning("removing a container record without pod", container_id=ctr.id, pod_id=ctr.pod_id)
            await self._remove_files(ctr)
            await fsutil.remove_file(self.store.container_dir / f"{ctr.id}.json")
            del self.store.orphans[ctr.id]

    def _secure_dirs(self, ctrs: list[ContainerRecord]) -> None:
        """Bundles and writable layers made by a shimd that left them open to everyone (0755) are closed."""
        for ctr in ctrs:
            pod = self.store.pods.get(ctr.pod_id)
            for path, group in ((Path(ctr.bundle), mapped_root_gid(pod) if pod else None),
                                (Path(ctr.fs_dir), None)):
                if ctr.fs_dir and path.is_dir():
                    fsutil.private_dir_sync(path, group)

    def _stand_in(self, cid: str, pod_id: str, running: bool = False) -> ContainerRecord:
        """running: its shim may still run its task, which removal then stops."""
        return ContainerRecord(id=cid, pod_id=pod_id, name=f"unreadable-{cid[:12]}", attempt=0,
                               created_at=time.time_ns(), config={}, image_ref="", image_id="", log_path="",
                               bundle=str(self.bundle_dir / cid), fs_dir=str(self.rw_dir / cid),
                               state=CONTAINER_RUNNING if running else CONTAINER_EXITED, reason="Unknown",
                               message="its record was unreadable")

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
        await self.store.update_container(ctr.id, state=CONTAINER_RUNNING, pid=int(st.pid), started_at=time.time_ns())
        if status == 3:
            await self.on_exit(pod.id, ctr.id, ExitInfo(int(st.exit_status), ts_ns(st.exited_at)))
        else:
            self.shims.watch(pod.id, ctr.id)


def spec_user(spec: dict[str, Any]) -> dict[str, Any]:
    """process.user of an OCI spec as the record keeps it: uid, gid, and groups with the primary gid first
    (what kubelet reports as the effective user). Empty when the spec has none."""
    try:
        user = spec["process"]["user"]
        gid = int(user["gid"])
        # Specs written before the primary gid was listed in additionalGids lack it; newer ones have it first.
        extra = [int(g) for g in user.get("additionalGids") or [] if int(g) != gid]
        return {"uid": int(user["uid"]), "gid": gid, "groups": [gid, *extra]}
    except (KeyError, TypeError, ValueError):
        return {}


def _bundle_spec(bundle: Path) -> Any:
    """The bundle's config.json as written (bounded read), or None when it cannot be read."""
    try:
        with open(bundle / "config.json", "rb") as f:
            return json.loads(f.read(4 << 20))
    except (OSError, ValueError):
        return None


def _bundle_user(bundle: Path) -> dict[str, Any]:
    return spec_user(_bundle_spec(bundle))


def _bundle_pod_id(bundle: Path) -> str:
    try:
        return str(_bundle_spec(bundle)["annotations"]["io.kubernetes.cri.sandbox-id"])
    except (KeyError, TypeError):
        return ""


def _create_log(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))


def _make_private_dirs(*paths: Path) -> None:
    for p in paths:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)


def _rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
                           "selinux_relabel": m.selinux_relabel, "propagation": int(m.propagation),
                           "recursive_read_only": m.recursive_read_only}
    if vol is not None:
        rec.update(image=m.image.image, user_specified_image=m.image.user_specified_image, image_id=vol.image_id,
                   image_sub_path=m.image_sub_path)
    return rec


def _set_mount_source(spec: dict[str, Any], planned: str, source: str) -> None:
    """The image volume's bind source once its sub path is resolved inside the mounted image."""
    for entry in spec["mounts"]:
        if entry.get("source") == planned:
            entry["source"] = source
