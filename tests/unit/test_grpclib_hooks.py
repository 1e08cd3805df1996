"""Each place shimd/cri/grpc_server.py reaches below grpclib's public API, checked against the installed grpclib.

grpclib, h2 and hpack are pinned in pyproject.toml; these tests are what must pass before a pin moves.
A failure here means grpclib changed something a hook relies on: read its new code, adapt the hook.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import inspect
import re
import tomllib
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import grpclib.protocol
import grpclib.server
import h2.connection
import h2.events
import hpack
import hpack.hpack
import hpack.table
import pytest
from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import Connection, EventsProcessor, H2Protocol

from shimd.api.runtime import v1 as cri
from shimd.cri import dispatch, grpc_server, h2_server, wire

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


class _Version(cri.RuntimeServiceBase):
    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(version="0.1.0", runtime_name="hooks-test")


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path) -> AsyncIterator[tuple[grpc_server.Server, str]]:
    socket = str(tmp_path / "grpc.sock")
    server = grpc_server.Server([dispatch.Wrapped(_Version())])
    await server.start(path=socket)
    try:
        yield server, socket
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


def _grpcio_call(socket: str, path: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        try:
            channel.unary_unary(path)(body, timeout=TIMEOUT)
        except grpc.RpcError as e:
            return e.code(), e.details()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


def _fingerprint(func: Any) -> str:
    return hashlib.sha256(inspect.getsource(func).encode()).hexdigest()


# --- Server._protocol_factory -------------------------------------------------------------------
async def test_server_start_hands_the_loop_our_protocol_factory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[H2Protocol] = []

    class Recording(grpc_server._ServerProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(self)
            super().connection_made(transport)

    monkeypatch.setattr(grpc_server, "_ServerProtocol", Recording)
    async with _serving(tmp_path) as (_, socket):
        assert await asyncio.to_thread(_grpcio_call, socket, "/runtime.v1.RuntimeService/Version", b"") == (
            grpc.StatusCode.OK, "")
    assert made, "grpclib's Server.start no longer builds connections with Server._protocol_factory"


async def test_grpclib_protocol_factory_and_protocol_attributes_are_as_hooked() -> None:
    # _protocol_factory calls grpclib's own for its handler bookkeeping and rebuilds the protocol from it.
    assert list(inspect.signature(H2Protocol.__init__).parameters) == ["self", "handler", "config", "h2_config"]
    server = grpc_server.Server([])
    plain = grpclib.server.Server._protocol_factory(server)
    assert type(plain) is H2Protocol
    assert plain.handler in server._handlers
    assert {name: getattr(plain, name) is not None for name in ("handler", "config", "h2_config")} == {
        "handler": True, "config": True, "h2_config": True}
    assert _fingerprint(grpclib.server.Server._protocol_factory) == (
        "a5201649d7236a46429cff2f6e4d4b52d9c7b5f10d08e15a69d708a9ae53429d"), "grpclib changed Server._protocol_factory"


# --- Server._mapping ----------------------------------------------------------------------------
async def test_unknown_paths_reach_our_method_table(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (server, socket):
        assert isinstance(server._mapping, grpc_server._Methods)
        assert "/runtime.v1.RuntimeService/Version" in server._mapping  # grpclib's table, kept whole
        code, details = await asyncio.to_thread(_grpcio_call, socket, "/runtime.v1.RuntimeService/NoSuchCall", b"")
    # grpclib's own answer lacks content-type, which grpc clients report as UNKNOWN or INTERNAL.
    assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)
    assert "/runtime.v1.RuntimeService/NoSuchCall: unknown method, not implemented by shimd" in details


def test_grpclib_builds_its_method_table_as_hooked() -> None:
    # Server.__init__ fills _mapping from each handler's __mapping__ (replaced after it), and
    # request_handler looks a path up with mapping.get (what _Methods overrides).
    init = inspect.getsource(grpclib.server.Server.__init__)
    assert "self._mapping = mapping" in init
    assert re.search(r"\bmapping\.get\(", inspect.getsource(grpclib.server.request_handler))


# --- H2Protocol.connection_made -----------------------------------------------------------------
def test_grpclib_connection_made_is_the_one_redone_here() -> None:
    # _ServerProtocol.connection_made repeats grpclib's steps with h2_server's connection: any change
    # in grpclib's (a new step, another order) must be carried over by hand.
    assert _fingerprint(H2Protocol.connection_made) == (
        "349133fc183764e5f50e3af9eb61faddb32a8e5ba484fd4d041b7aefdfc0691d"), "grpclib changed connection_made"
    assert list(inspect.signature(Connection.__init__).parameters) == ["self", "connection", "transport", "config"]
    assert inspect.signature(Connection.__init__).parameters["config"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(EventsProcessor.__init__).parameters) == ["self", "handler", "connection"]
    for name in ("flush", "initialize"):
        assert callable(getattr(Connection, name))


# What grpclib's server side may use of the HTTP/2 connection, read from grpclib/protocol.py.
_USED_OF_H2 = {
    "acknowledge_received_data", "data_to_send", "end_stream", "increment_flow_control_window",
    "initiate_connection", "local_flow_control_window", "local_settings", "max_outbound_frame_size", "ping",
    "receive_data", "reset_stream", "send_data", "send_headers", "state_machine", "streams", "update_settings",
}
# Client-side calls, and a clean-up grpclib guards with hasattr.
_NOT_NEEDED = {"get_next_available_stream_id", "_frame_dispatch_table"}


def _h2_attributes_grpclib_uses() -> set[str]:
    tree = ast.parse(inspect.getsource(grpclib.protocol))
    used = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id == "h2_conn":
            used.add(node.attr)
        elif (isinstance(owner, ast.Attribute) and owner.attr in ("_connection", "_h2_connection")
              and isinstance(owner.value, ast.Name) and owner.value.id == "self"):
            used.add(node.attr)
    return used


def test_h2_server_has_all_grpclib_uses_of_the_h2_connection() -> None:
    assert _h2_attributes_grpclib_uses() == _USED_OF_H2 | _NOT_NEEDED, "grpclib uses its h2 connection differently"
    conn = h2_server.ServerConnection()
    conn.initiate_connection()
    missing = [name for name in sorted(_USED_OF_H2) if not hasattr(conn, name)]
    assert not missing, f"h2_server.ServerConnection lacks {missing}"
    # grpclib compares the connection state by identity with h2's enum
    assert conn.state_machine.state is not h2.connection.ConnectionState.CLOSED


def test_grpclib_handles_every_event_h2_server_emits() -> None:
    emitted = {cls for cls in vars(h2_server).values()
               if isinstance(cls, type) and issubclass(cls, h2.events.Event) and cls is not h2.events.Event}
    handled = set(EventsProcessor(None, None).processors)  # type: ignore[arg-type]
    assert emitted and emitted <= handled, emitted - handled


# --- Stream.recv_message ------------------------------------------------------------------------
async def test_recv_message_replaced_on_the_stream_is_what_handlers_call(tmp_path: Path) -> None:
    assert "recv_message" not in getattr(grpclib.server.Stream, "__slots__", ())
    assert inspect.iscoroutinefunction(grpclib.server.Stream.recv_message)
    async with _serving(tmp_path) as (_, socket):
        # field 1 (version, a string) sent as a varint
        code, details = await asyncio.to_thread(_grpcio_call, socket, "/runtime.v1.RuntimeService/Version",
                                                b"\x08\x01")
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "Version: malformed request message" in details


# --- the unary path (unary.py): grpclib's answers it repeats, and the connection pieces it is given --
def test_unary_path_mirrors_grpclib_request_handling_as_it_is() -> None:
    # unary.UnaryCalls takes a call only where grpclib's request_handler would reach the method, and answers
    # with the headers and trailers Stream sends; tests/unit/test_unary_fast_path.py compares the two on the
    # wire. A change in any of these needs that comparison rerun and the path read again.
    stream = grpclib.server.Stream
    expected = {
        grpclib.server.request_handler: "2dcc6d45dfbe7d0824381608698e12d65d8db56275500411f3b17e6ac41f1c99",
        stream.send_initial_metadata: "0783bddf633978a70a428e05f7c1a2264930603a00ff928c1aaeb5b8b4b560d2",
        stream.send_trailing_metadata: "a1cae6b7f4a1225589a02f38729fc2f4f5a6e5f2efd05cab9cef9a0e31ab698f",
        stream.__aexit__: "e1b5fef648afc9776098f03fe64a8d816a66e2ec2c99eb2178e2be89865f17e7",
        EventsProcessor.process: "5dba9947784c778b4044074c792b23ed6cc4eaba604043850b0a8ebac9d69c8f",
        Connection.flush: "000d44d32892bdb6c2ac0cac2306af7c2e5a5699ad25a8bef059e3b2f34a0463",
    }
    changed = [f.__qualname__ for f, digest in expected.items() if _fingerprint(f) != digest]
    assert not changed, f"grpclib changed {changed}"


async def test_unary_path_gets_its_connection_pieces_from_grpclib_protocol() -> None:
    server = grpc_server.Server([dispatch.Wrapped(_Version())])
    proto = server._protocol_factory()
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    assert proto.unary is not None
    wire = proto.unary._wire
    assert wire.h2 is proto.connection._connection
    assert wire.write_ready is proto.connection.write_ready  # grpclib's pause_writing/resume_writing set it
    assert "/runtime.v1.RuntimeService/Version" in proto.unary._methods
    assert grpc_server.Server([dispatch.Wrapped(_Version())], unary_fast_path=False)._protocol_factory().unary is None


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return None


# --- not hooks, but grpclib and hpack behaviour shimd's code relies on --------------------------
def test_grpclib_codec_serializes_preencoded_answers_as_given() -> None:
    # wire.preencoded: grpclib's ProtoCodec checks the type and calls SerializeToString.
    payload = bytes(cri.VersionResponse(version="0.1.0", runtime_name="x"))
    assert ProtoCodec().encode(wire.preencoded(cri.VersionResponse, payload), cri.VersionResponse) == payload


def test_hpack_pieces_h2_server_uses() -> None:
    assert bytes(hpack.hpack.encode_integer(1337, 5)) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    assert len(hpack.table.HeaderTable.STATIC_TABLE) == 61
    assert hpack.table.HeaderTable.STATIC_TABLE[0] == (b":authority", b"")
    assert "max_header_list_size" in inspect.signature(hpack.Decoder.__init__).parameters


def test_hooked_packages_are_pinned_to_the_installed_versions() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {m.group(1): m.group(2) for d in deps if (m := re.fullmatch(r"(grpclib|h2|hpack)==([\w.]+)", d))}
    assert pins == {name: metadata.version(name) for name in ("grpclib", "h2", "hpack")}
