"""Container RPCs: lifecycle, status, listing, resources."""

from __future__ import annotations

from collections.abc import AsyncIterator

import betterproto

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.cri import convert, validate, wire
from shimd.cri.rpc_base import RpcBase, pages
from shimd.oci import spec as ocispec
from shimd.store.records import CONTAINER_RUNNING, ContainerRecord


class ContainerRpcs(RpcBase):
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
        return cri.ContainerStatusResponse(status=self._container_status(ctr),
                                           info=convert.container_info(ctr) if request.verbose else {})

    def _listed_containers(self, f: cri.ContainerFilter | None) -> list[ContainerRecord]:
        if f is None:
            return list(self.d.store.containers.values())
        want = convert.read_filter(f)
        return [c for c in self.d.store.containers.values()
                if want.admits(c.id, c.labels, c.pod_id, convert.container_state(c))]

    async def list_containers(self, request: cri.ListContainersRequest) -> cri.ListContainersResponse:
        f = wire.submessage(request, "filter")
        if f is None:
            payload = self._container_list.payload(self.d.store.generation, lambda: self._encode_containers(None))
        else:
            payload = self._encode_containers(f)
        return wire.preencoded(cri.ListContainersResponse, payload)

    def _encode_containers(self, f: cri.ContainerFilter | None) -> bytes:
        items = [self._container_cache.encoded(r) for r in self._listed_containers(f)]
        self._container_cache.prune(self.d.store.containers)
        return wire.repeated_message_field(1, items)

    async def stream_containers(self, request: cri.StreamContainersRequest
                                ) -> AsyncIterator[cri.StreamContainersResponse]:
        f = wire.submessage(request, "filter")
        for page in pages(self._listed_containers(f)):
            yield cri.StreamContainersResponse(containers=[convert.container_summary(c) for c in page])

    async def checkpoint_container(self, request: cri.CheckpointContainerRequest) -> cri.CheckpointContainerResponse:
        cid = validate.required_id(request.container_id, "container_id")
        location = validate.archive_path(request.location, "location")
        await self.d.containers.checkpoint(cid, location, validate.timeout(request.timeout, "timeout"))
        return cri.CheckpointContainerResponse()

    async def reopen_container_log(self, request: cri.ReopenContainerLogRequest) -> cri.ReopenContainerLogResponse:
        await self.d.containers.reopen_log(validate.required_id(request.container_id, "container_id"))
        return cri.ReopenContainerLogResponse()

    # --- resources ------------------------------------------------------------------------------
    async def update_container_resources(self, request: cri.UpdateContainerResourcesRequest
                                         ) -> cri.UpdateContainerResourcesResponse:
        cid = validate.required_id(request.container_id, "container_id")
        if not betterproto.serialized_on_wire(request.linux):
            raise errors.InvalidArgument("linux must be set (only Linux resources are supported)")
        ocispec.validate_resources(request.linux, "linux")
        await self.d.containers.update_resources(cid, request.linux)
        return cri.UpdateContainerResourcesResponse()

    async def update_pod_sandbox_resources(self, request: cri.UpdatePodSandboxResourcesRequest
                                           ) -> cri.UpdatePodSandboxResourcesResponse:
        pod_id = validate.required_id(request.pod_sandbox_id, "pod_sandbox_id")
        given = {}
        for name in ("overhead", "resources"):
            res = getattr(request, name)
            if betterproto.serialized_on_wire(res):
                ocispec.validate_resources(res, name)
                given[name] = res
        await self.d.pods.update_resources(pod_id, given.get("resources"), given.get("overhead"))
        return cri.UpdatePodSandboxResourcesResponse()

    @staticmethod
    def _require_running(ctr: ContainerRecord) -> None:
        if ctr.state != CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {ctr.id} is not running (state {ctr.state})")

    def _container_status(self, ctr: ContainerRecord) -> cri.ContainerStatus:
        status = convert.container_status(ctr, self._image_ref(ctr.image_id))
        # The current resources (as created, then as updated): kubelet compares them for in-place resize.
        res = (ctr.config.get("linux") or {}).get("resources")
        if res:
            status.resources = cri.ContainerResources(linux=cri.LinuxContainerResources().from_dict(res))
        return status

    def _image_ref(self, image_id: str) -> str:
        image = self.d.images.get(image_id)
        if image is None:
            return image_id
        return image.repo_digests[0] if image.repo_digests else image.id
