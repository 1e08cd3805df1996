"""Issue 16 item 7: a hostile client on the CRI socket, spoken to by h2's client connection (and raw frames
where the client breaks the rules), against a real shimd. Memory is judged by the daemon's peak RSS."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from shimd.api.runtime import v1 as cri
from tests.support.daemon import ShimdProcess

MiB = 1 << 20
FRAME = 16384
GROWTH_BOUND = 48 * MiB  # the windows (4 MiB a stream and a connection) plus slack; the blasts are 64-128 MiB


def _request(path: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
            ("te", "trailers"), ("content-type", "application/grpc"), ("grpc-timeout", "60S")]


def _grpc_message(body: bytes, declared: int | None = None) -> bytes:
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


def _data_frame(stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) << 8, 0, stream_id) + payload


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class RawClient:
    """h2's client connection over the unix socket; `blast` writes DATA frames ignoring every window."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.eof = False
        self.flush()
        self.read_until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in self.events))
        self.flush()  # our SETTINGS ack

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def read_until(self, done: Callable[[], bool], timeout: float = 30) -> None:
        self.sock.settimeout(timeout)
        while not done() and not self.eof:
            try:
                data = self.sock.recv(1 << 16)
            except (TimeoutError, ConnectionResetError):
                return
            if not data:
                self.eof = True
                return
            self.events += self.conn.receive_data(data)

    def terminated(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def grpc_status(self, stream_id: int) -> tuple[str, str] | None:
        for e in self.events:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and e.stream_id == stream_id:
                headers = dict(e.headers)
                if "grpc-status" in headers:
                    return headers["grpc-status"], headers.get("grpc-message", "")
        return None

    def blast(self, stream_id: int, total: int) -> threading.Thread:
        """Writes `total` bytes of DATA on stream_id from a thread, never waiting for a window; stops when
        the daemon closes the connection."""
        chunk = b"".join(_data_frame(stream_id, b"x" * FRAME) for _ in range(MiB // FRAME))

        def run() -> None:
            with contextlib.suppress(OSError):
                for _ in range(total // MiB):
                    self.sock.sendall(chunk)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(shimd_factory: Callable[..., ShimdProcess]) -> Iterator[ShimdProcess]:
    proc = shimd_factory()
    proc.start()
    yield proc


@pytest.fixture
def client(daemon: ShimdProcess) -> Iterator[RawClient]:
    c = RawClient(daemon.socket)
    yield c
    c.close()


def test_declared_huge_message_is_refused_and_the_daemon_does_not_grow(daemon: ShimdProcess,
                                                                       client: RawClient) -> None:
    assert daemon.proc is not None
    before = _hwm(daemon.proc.pid)
    client.conn.send_headers(1, _request("/runtime.v1.RuntimeService/Version"))
    client.flush()
    client.sock.sendall(_data_frame(1, _grpc_message(b"x" * (FRAME - 5), declared=1 << 30)))
    writer = client.blast(1, 128 * MiB)
    writer.join(timeout=120)
    client.read_until(lambda: client.grpc_status(1) is not None or client.terminated() is not None, timeout=10)
    growth = _hwm(daemon.proc.pid) - before
    assert growth < GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MiB"
    status = client.grpc_status(1)
    ended = client.terminated()
    assert status is not None or ended is not None, "no answer to a 1 GiB request"
    if status is not None:
        assert status[0] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), status
        assert "max_recv_message_size" in status[1]
    else:
        assert ended is not None and ended.error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert daemon.client is not None and daemon.client.runtime.Version(daemon.client.pb.VersionRequest())


def test_data_past_the_window_ends_the_connection_with_flow_control_error(
        shimd_factory: Callable[..., ShimdProcess]) -> None:
    """A handler busy with a request (a pull from a registry that never answers) reads no more of its stream:
    what the client sends beyond the stream's window is a FLOW_CONTROL_ERROR, not daemon memory."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog and are never answered
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = shimd_factory(f'[registries.hosts."{host}"]\ninsecure = true\n')
        proc.start()
        assert proc.proc is not None
        c = RawClient(proc.socket)
        try:
            before = _hwm(proc.proc.pid)
            body = bytes(cri.PullImageRequest(image=cri.ImageSpec(image=f"{host}/stalls:1")))
            c.conn.send_headers(1, _request("/runtime.v1.ImageService/PullImage"))
            c.flush()
            c.sock.sendall(_data_frame(1, _grpc_message(body)))
            writer = c.blast(1, 64 * MiB)
            writer.join(timeout=120)
            c.read_until(lambda: c.terminated() is not None, timeout=10)
            growth = _hwm(proc.proc.pid) - before
            ended = c.terminated()
            assert ended is not None and ended.error_code == ErrorCodes.FLOW_CONTROL_ERROR, c.events[-5:]
            assert growth < GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MiB"
        finally:
            c.close()


def test_rapid_reset_gets_goaway_enhance_your_calm(daemon: ShimdProcess, client: RawClient) -> None:
    """CVE-2023-44487: streams opened and reset at once, each starting a handler for nothing."""
    frames = []
    for i in range(1000):
        sid = 2 * i + 1
        client.conn.send_headers(sid, _request("/runtime.v1.RuntimeService/Version"))
        client.conn.send_data(sid, _grpc_message(b""), end_stream=True)
        client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        frames.append(client.conn.data_to_send())
    with contextlib.suppress(OSError):
        client.sock.sendall(b"".join(frames))
    client.read_until(lambda: client.terminated() is not None)
    ended = client.terminated()
    assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM, client.events[-3:]
    # Other clients are unaffected.
    assert daemon.client is not None and daemon.client.runtime.Version(daemon.client.pb.VersionRequest())


def test_max_recv_message_size_is_configurable(shimd_factory: Callable[..., ShimdProcess],
                                               tmp_path: Path) -> None:
    proc = shimd_factory()
    # The factory writes the [daemon] table itself: the key goes into it.
    proc.config_path.write_text(proc.config_path.read_text().replace(
        'log_level = "debug"\n', 'log_level = "debug"\nmax_recv_message_size = 65536\n'))
    client = proc.start()
    pb = client.pb
    cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="big", namespace="default", uid="u-big"),
                              annotations={"blob": "x" * 100_000}, log_directory=str(tmp_path))
    with pytest.raises(grpc.RpcError) as e:
        client.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "max_recv_message_size" in (e.value.details() or "")
    assert client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
