"""Pod sandbox RPCs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from shimd.api.runtime import v1 as cri
from shimd.cri import convert, validate, wire
from shimd.cri.rpc_base import RpcBase, pages
from shimd.store.records import PodRecord


class PodRpcs(RpcBase):
    # --- pods ------------------------------------------------------------------------------
    async def run_pod_sandbox(self, request: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
        valid = validate.pod_config(request.config)
        pod_id = await self.d.pods.run(valid.config, request.runtime_handler, valid.userns)
        return cri.RunPodSandboxResponse(pod_sandbox_id=pod_id)

    async def stop_pod_sandbox(self, request: cri.StopPodSandboxRequest) -> cri.StopPodSandboxResponse:
        await self.d.pods.stop(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.StopPodSandboxResponse()

    async def remove_pod_sandbox(self, request: cri.RemovePodSandboxRequest) -> cri.RemovePodSandboxResponse:
        await self.d.pods.remove(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        return cri.RemovePodSandboxResponse()

    async def pod_sandbox_status(self, request: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:
        pod = self.d.store.pod(validate.required_id(request.pod_sandbox_id, "pod_sandbox_id"))
        statuses = [self._container_status(c) for c in self.d.store.pod_containers(pod.id)]
        return cri.PodSandboxStatusResponse(status=convert.pod_status(pod),
                                            info=convert.pod_info(pod) if request.verbose else {},
                                            containers_statuses=statuses, timestamp=time.time_ns())

    def _listed_pods(self, f: cri.PodSandboxFilter | None) -> list[PodRecord]:
        want = convert.read_filter(f) if f is not None else None
        return [p for p in self.d.store.pods.values()
                if not p.initializing and (want is None or want.admits(p.id, p.labels, state=convert.pod_state(p)))]

    async def list_pod_sandbox(self, request: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:
        f = wire.submessage(request, "filter")
        if f is None:
            payload = self._pod_list.payload(self.d.store.generation, lambda: self._encode_pods(None))
        else:
            payload = self._encode_pods(f)
        return wire.preencoded(cri.ListPodSandboxResponse, payload)

    def _encode_pods(self, f: cri.PodSandboxFilter | None) -> bytes:
        items = [self._pod_cache.encoded(r) for r in self._listed_pods(f)]
        self._pod_cache.prune(self.d.store.pods)
        return wire.repeated_message_field(1, items)

    async def stream_pod_sandboxes(self, request: cri.StreamPodSandboxesRequest
                                   ) -> AsyncIterator[cri.StreamPodSandboxesResponse]:
        f = wire.submessage(request, "filter")
        for page in pages(self._listed_pods(f)):
            yield cri.StreamPodSandboxesResponse(pod_sandboxes=[convert.pod_summary(p) for p in page])
