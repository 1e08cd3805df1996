"""shimd's gRPC server (grpclib over h2_server) as grpc-go sees it: kubelet's stack, here through `ctr`.

No Go CRI client is packaged in Debian 12, but containerd's `ctr` is (containerd is a dependency):
it speaks grpc-go to whatever socket it is given. The server here is shimd's own gRPC server with a
stand-in for containerd's version service, so the call succeeds end to end, and with shimd's real
services, whose method table does not hold ctr's calls, which must come back UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto
import grpc
import grpclib.server
import pytest
from betterproto.lib.google.protobuf import Empty
from grpclib.const import Cardinality, Handler

from shimd.cri import dispatch, grpc_server
from tests.support.transport import fast_path_calls

CTR = shutil.which("ctr")
pytestmark = pytest.mark.skipif(CTR is None, reason="ctr (containerd package) is not installed")


@dataclass(eq=False, repr=False)
class VersionResponse(betterproto.Message):
    version: str = betterproto.string_field(1)
    revision: str = betterproto.string_field(2)


class FakeContainerdVersion:
    """containerd.services.version.v1.Version, answering with a long revision (more than one frame's worth)."""

    revision = "r" * 20_000

    async def version(self, stream: grpclib.server.Stream) -> None:
        await stream.recv_message()
        await stream.send_message(VersionResponse(version="9.9.9-shimd-test", revision=self.revision))

    def __mapping__(self) -> dict[str, Handler]:
        return {"/containerd.services.version.v1.Version/Version":
                Handler(self.version, Cardinality.UNARY_UNARY, Empty, VersionResponse)}


async def _ctr(socket: Path, *args: str) -> tuple[int, str]:
    assert CTR is not None
    proc = await asyncio.create_subprocess_exec(CTR, "--address", str(socket), "--timeout", "10s", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


async def _serving(handlers: list[Any], socket: Path) -> grpc_server.Server:
    server = grpc_server.Server(handlers)
    await server.start(path=str(socket))
    return server


@pytest.mark.parametrize("through_dispatch", [False, True], ids=["grpclib", "unary-fast-path"])
async def test_grpc_go_call_round_trips(tmp_base: Path, through_dispatch: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Wrapped by dispatch, the call is served by grpc_server's unary path (unary.py) instead of grpclib's.
    fast = fast_path_calls(monkeypatch)
    service = FakeContainerdVersion()
    socket = tmp_base / "go.sock"
    server = await _serving([dispatch.Wrapped(service) if through_dispatch else service], socket)
    try:
        for _ in range(3):  # one connection per ctr run: handshake, settings, call, goaway each time
            _, out = await _ctr(socket, "version")
            assert "9.9.9-shimd-test" in out, out[-500:]
            assert FakeContainerdVersion.revision in out
            # ctr then asks for the server's UUID, which the stand-in does not serve
            assert "rpc error" not in out and "Introspection/Server: unknown method" in out, out[-500:]
        assert len(fast) == (3 if through_dispatch else 0)
    finally:
        server.close()
        await server.wait_closed()


async def test_unknown_methods_are_unimplemented_for_grpc_go_and_grpcio(tmp_base: Path) -> None:
    socket = tmp_base / "go.sock"
    server = await _serving([FakeContainerdVersion()], socket)
    try:
        rc, out = await _ctr(socket, "namespaces", "ls")
        assert rc != 0
        # grpc-go reports what it was told, not "missing content-type field" (UNKNOWN)
        assert "/containerd.services.namespaces.v1.Namespaces/List: unknown method" in out
        assert "not implemented" in out and "content-type" not in out

        def grpcio_call() -> grpc.RpcError:
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                call = channel.unary_unary("/runtime.v1.RuntimeService/NoSuchCall")
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=10)
                return err.value

        err = await asyncio.to_thread(grpcio_call)
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
        assert "/runtime.v1.RuntimeService/NoSuchCall" in err.details()  # type: ignore[attr-defined]
    finally:
        server.close()
        await server.wait_closed()
