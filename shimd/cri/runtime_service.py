"""runtime.v1.RuntimeService: validates CRI requests and hands them to the pod/container layer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import betterproto

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.cri import convert, runtime_info, validate
from shimd.store.records import CONTAINER_RUNNING, POD_READY, ContainerRecord

if TYPE_CHECKING:
    from shimd.daemon import Daemon


class RuntimeService(cri.RuntimeServiceBase):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    # --- runtime ---------------------------------------------------------------------------
    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return runtime_info.version()

    async def status(self, status_request: cri.StatusRequest) -> cri.StatusResponse:
        return runtime_info.status(self.d.cfg, self.d.handler_reports(), self.d.network_status,
                                   status_request.verbose)

    async def runtime_config(self, runtime_config_request: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return runtime_info.runtime_config(self.d.cfg)

    async def update_runtime_config(self, request: cri.UpdateRuntimeConfigRequest) -> cri.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr if request.runtime_config else ""
        if cidr:
            self.d.network.set_pod_cidr(cidr)
        return cri.UpdateRuntimeConfigResponse()

    # --- pods ------------------------------------------------------------------------------
    async def run_pod_sandbox(self, request: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        config = validate.pod_config(request.config)
        pod_id = await self.d.pods.run(config, request.runtime_handler)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    async def stop_pod_sandbox(self, request: cri.StopPodSandboxRequest) -> cri.StopPodSandboxResponse:
        await self.d.pods.stop(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(self, request: cri.RemovePodSandboxRequest) -> cri.RemovePodSandboxResponse:
        await self.d.pods.remove(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(self, request: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        statuses = [convert.container_status(c, self._image_ref(c.image_id))
                    for c in self.d.store.pod_containers(pod.id)]
        return cri.PodSandboxStatusResponse(status=convert.pod_status(pod),
                                            info=convert.pod_info(pod) if request.verbose else {},
                                            containers_statuses=statuses, timestamp=time.time_ns())

    async def list_pod_sandbox(self, request: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        items = []
        for pod in self.d.store.pods.values():
            if pod.initializing:
                continue
            if f is not None:
                if f.id and not pod.id.startswith(f.id):
                    continue
                if betterproto.serialized_on_wire(f.state) and convert.pod_state(pod) != f.state.state:
                    continue
                if not convert.labels_match(pod.labels, f.label_selector):
                    continue
            items.append(convert.pod_summary(pod))
        return cri.ListPodSandboxResponse(items=items)

    # --- containers ------------------------------------------------------------------------
    async def create_container(self, request: cri.CreateContainerRequest) -> cri.CreateContainerResponse:
        validate.required_id(request.pod_sandbox_id, "pod_sandbox_id")
        config = validate.container_config(request.config)
        cid = await self.d.containers.create(request.pod_sandbox_id, config)
        return cri.CreateContainerResponse(container_id=cid)

    async def start_container(self, request: cri.StartContainerRequest) -> cri.StartContainerResponse:
        await self.d.containers.start(validate.required_id(request.container_id, "container_id"))
        return cri.StartContainerResponse()

    async def stop_container(self, request: cri.StopContainerRequest) -> cri.StopContainerResponse:
        await self.d.containers.stop(validate.required_id(request.container_id, "container_id"),
                                     validate.timeout(request.timeout, "timeout"))
        return cri.StopContainerResponse()

    async def remove_container(self, request: cri.RemoveContainerRequest) -> cri.RemoveContainerResponse:
        await self.d.containers.remove(validate.required_id(request.container_id, "container_id"))
        return cri.RemoveContainerResponse()

    async def container_status(self, request: cri.ContainerStatusRequest) -> cri.ContainerStatusResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        return cri.ContainerStatusResponse(status=convert.container_status(ctr, self._image_ref(ctr.image_id)),
                                           info=convert.container_info(ctr) if request.verbose else {})

    async def list_containers(self, request: cri.ListContainersRequest) -> cri.ListContainersResponse:
        f = request.filter if betterproto.serialized_on_wire(request.filter) else None
        out = []
        for ctr in self.d.store.containers.values():
            if f is not None:
                if f.id and not ctr.id.startswith(f.id):
                    continue
                if f.pod_sandbox_id and not ctr.pod_id.startswith(f.pod_sandbox_id):
                    continue
                if betterproto.serialized_on_wire(f.state) and convert.container_state(ctr) != f.state.state:
                    continue
                if not convert.labels_match(ctr.labels, f.label_selector):
                    continue
            out.append(convert.container_summary(ctr))
        return cri.ListContainersResponse(containers=out)

    async def reopen_container_log(self, request: cri.ReopenContainerLogRequest) -> cri.ReopenContainerLogResponse:
        await self.d.containers.reopen_log(validate.required_id(request.container_id, "container_id"))
        return cri.ReopenContainerLogResponse()

    # --- exec and streaming -----------------------------------------------------------------
    async def exec_sync(self, request: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
        validate.required_id(request.container_id, "container_id")
        if not request.cmd:
            raise errors.InvalidArgument("cmd must not be empty")
        timeout = validate.timeout(request.timeout, "timeout")
        res = await self.d.execs.run_sync(request.container_id, list(request.cmd), float(timeout) if timeout else None)
        stderr = res.stderr
        if res.truncated:
            stderr += b"\n[shimd: output truncated at 16 MiB per stream]\n"
        return cri.ExecSyncResponse(stdout=res.stdout, stderr=stderr, exit_code=res.exit_code)

    async def exec(self, request: cri.ExecRequest) -> cri.ExecResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        if not request.cmd:
            raise errors.InvalidArgument("cmd must not be empty")
        if not (request.stdin or request.stdout or request.stderr):
            raise errors.InvalidArgument("one of stdin, stdout and stderr must be set")
        if request.tty and request.stderr:
            raise errors.InvalidArgument("stderr must be false when tty is set (the terminal merges it)")
        self._require_running(ctr)
        return cri.ExecResponse(url=self.d.streaming.exec_url(ctr.id, list(request.cmd), request.tty,
                                                              request.stdin, request.stdout, request.stderr))

    async def attach(self, request: cri.AttachRequest) -> cri.AttachResponse:
        ctr = self.d.store.container(validate.required_id(request.container_id, "container_id"))
        if not (request.stdin or request.stdout or request.stderr):
            raise errors.InvalidArgument("one of stdin, stdout and stderr must be set")
        if request.stdin:
            raise errors.FailedPrecondition("attach: stdin is not supported by shimd yet (output only)")
        self._require_running(ctr)
        return cri.AttachResponse(url=self.d.streaming.attach_url(ctr.id, request.tty, request.stdin,
                                                                  request.stdout, request.stderr))

    async def port_forward(self, request: cri.PortForwardRequest) -> cri.PortForwardResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        if pod.state != POD_READY:
            raise errors.FailedPrecondition(f"pod sandbox {pod.id} is not ready")
        for i, port in enumerate(request.port):
            if not 0 < port < 65536:
                raise errors.InvalidArgument(f"port[{i}] {port} is out of range")
        return cri.PortForwardResponse(url=self.d.streaming.portforward_url(pod.id, list(request.port)))

    @staticmethod
    def _require_running(ctr: ContainerRecord) -> None:
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running (state {ctr.state})")

    def _image_ref(self, image_id: str) -> str:
        image = self.d.images.get(image_id)
        if image is None:
            return image_id
        return image.repo_digests[0] if image.repo_digests else image.id

