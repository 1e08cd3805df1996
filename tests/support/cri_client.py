"""An independent CRI client: the official grpcio + protobuf stack, generated at test time from
../shared/protos, exactly as kubelet's own client is generated from the same api.proto.
Nothing here imports shimd."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import grpc

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO.parent / "shared" / "protos"
OUT = REPO / "tests" / ".generated"


def _generate() -> None:
    src = PROTOS / "k8s.io" / "cri-api" / "runtime" / "v1" / "api.proto"
    stamp = OUT / ".stamp"
    if stamp.exists() and stamp.read_text() == str(src.stat().st_mtime_ns):
        return
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{src.parent}", f"--python_out={OUT}",
         f"--grpc_python_out={OUT}", str(src)],
        check=True,
    )
    stamp.write_text(str(src.stat().st_mtime_ns))


def modules() -> tuple[ModuleType, ModuleType]:
    """(api_pb2, api_pb2_grpc)."""
    _generate()
    if str(OUT) not in sys.path:
        sys.path.insert(0, str(OUT))
    return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")


class CriClient:
    """Runtime and image stubs on one channel; `pb` is the message module."""

    def __init__(self, socket_path: str) -> None:
        self.pb, grpc_mod = modules()
        self.channel = grpc.insecure_channel(f"unix://{socket_path}",
                                             options=[("grpc.max_receive_message_length", 64 << 20)])
        self.runtime = grpc_mod.RuntimeServiceStub(self.channel)
        self.images = grpc_mod.ImageServiceStub(self.channel)

    def wait_ready(self, timeout: float = 15.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()
