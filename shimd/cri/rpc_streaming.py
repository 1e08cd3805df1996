"""ExecSync, and the Exec/Attach/PortForward RPCs that hand out streaming URLs."""

from __future__ import annotations

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.cri import validate
from shimd.cri.rpc_base import RpcBase
from shimd.store.records import POD_READY


class StreamingRpcs(RpcBase):
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
        if request.stdin and not ctr.stdin:
            raise errors.FailedPrecondition(f"container {ctr.id} was not created with stdin; cannot attach stdin")
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
