"""runtime.v1.RuntimeService: validates CRI requests and hands them to the pod/container layer.

The RPCs live in one mixin per area (rpc_*.py); this class puts them together with the runtime-level
RPCs (Version, Status, RuntimeConfig).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from shimd.api.runtime import v1 as cri
from shimd.cri import runtime_info, summary_wire, wire
from shimd.cri.rpc_containers import ContainerRpcs
from shimd.cri.rpc_events import EventRpcs
from shimd.cri.rpc_pods import PodRpcs
from shimd.cri.rpc_stats import StatsRpcs
from shimd.cri.rpc_streaming import StreamingRpcs

if TYPE_CHECKING:
    from shimd.cri.deps import CriDeps


class RuntimeService(PodRpcs, ContainerRpcs, StreamingRpcs, StatsRpcs, EventRpcs, cri.RuntimeServiceBase):
    def __init__(self, deps: CriDeps) -> None:
        self.d = deps
        # A summary changes only with its record's state (pod labels and metadata are fixed at creation).
        self._pod_cache = wire.EncodingCache(summary_wire.pod, lambda p: p.state, lambda p: p.id)
        self._container_cache = wire.EncodingCache(summary_wire.container, lambda c: c.state, lambda c: c.id)
        self._pod_list = wire.ListCache()
        self._container_list = wire.ListCache()
        # Last pod status seen per pod, so events about a removed pod still carry its metadata.
        self._last_pod_status: OrderedDict[str, bytes] = OrderedDict()
        deps.events.add_listener(self._remember_pod)
        # kubelet asks for Status every few seconds and it rarely changes: the encoding is kept per inputs.
        self._status: tuple[object, bytes] = (None, b"")

    # --- runtime ---------------------------------------------------------------------------
    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return runtime_info.version()

    async def status(self, status_request: cri.StatusRequest) -> cri.StatusResponse:
        handlers, network = self.d.handler_reports(), self.d.network_status()
        inputs = (tuple(handlers), network, status_request.verbose)
        if self._status[0] != inputs:
            self._status = (inputs, bytes(runtime_info.status(self.d.cfg, handlers, network, status_request.verbose)))
        return wire.preencoded(cri.StatusResponse, self._status[1])

    async def runtime_config(self, runtime_config_request: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return runtime_info.runtime_config(self.d.cfg)

    async def update_runtime_config(self, request: cri.UpdateRuntimeConfigRequest) -> cri.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr if request.runtime_config else ""
        if cidr:
            self.d.network.set_pod_cidr(cidr)
        return cri.UpdateRuntimeConfigResponse()
