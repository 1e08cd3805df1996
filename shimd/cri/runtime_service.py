"""runtime.v1.RuntimeService: validates CRI requests and hands them to the pod/container layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shimd.api.runtime import v1 as cri
from shimd.cri import runtime_info

if TYPE_CHECKING:
    from shimd.daemon import Daemon


class RuntimeService(cri.RuntimeServiceBase):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return runtime_info.version()

    async def status(self, status_request: cri.StatusRequest) -> cri.StatusResponse:
        return runtime_info.status(self.d.cfg, await self.d.handler_reports(), self.d.network_status,
                                   status_request.verbose)

    async def runtime_config(self, runtime_config_request: cri.RuntimeConfigRequest) -> cri.RuntimeConfigResponse:
        return runtime_info.runtime_config(self.d.cfg)
