"""Malformed input: random, structured-random and mutated protobuf requests to every RPC, and raw bytes
on the socket. No crash, no hang: every request is answered with a status, and shimd keeps serving.

SHIMD_FUZZ_EXAMPLES bounds each hypothesis run (default 60 per strategy; `make soak` raises it).
"""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pbd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cri_client import modules
from tests.support.runtime import Runtime

EXAMPLES = int(os.environ.get("SHIMD_FUZZ_EXAMPLES", "60"))
CALL_TIMEOUT = 30.0
PB, _ = modules()
METHODS = [(f"/{s.full_name}/{m.name}", m) for s in PB.DESCRIPTOR.services_by_name.values() for m in s.methods]
# Structured requests to these could reach out to random registries or start real pods: they get
# mutated bytes only (built from a harmless seed request).
NO_STRUCTURED = {"PullImage", "RunPodSandbox", "CreateContainer"}
# A status that means the server crashed, closed the connection or never answered.
BAD = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _seed(method: pbd.MethodDescriptor) -> bytes:
    """A harmless well-formed request: unknown ids, a registry on a closed port."""
    msg = PB.__dict__[method.input_type.name]()
    for f in method.input_type.fields:
        if f.name in ("container_id", "pod_sandbox_id") and f.type == f.TYPE_STRING:
            setattr(msg, f.name, "0" * 64)
    if method.name == "PullImage":
        msg.image.image = "127.0.0.1:1/fuzz/none:1"
    if method.name in ("RunPodSandbox", "CreateContainer"):
        msg.config.metadata.name = "fuzz"
    return bytes(msg.SerializeToString())


def _random_message(desc: pbd.Descriptor, rng: random.Random, depth: int = 0) -> Any:
    msg = PB.__dict__.get(desc.name)
    msg = msg() if msg is not None and msg.DESCRIPTOR is desc else _message_class(desc)()
    for f in desc.fields:
        if rng.random() < 0.5:
            continue
        repeated = f.is_repeated
        count = rng.randrange(0, 3) if repeated else 1
        for _ in range(count):
            if f.type == f.TYPE_MESSAGE:
                if depth > 3:
                    break
                if f.message_type.GetOptions().map_entry:
                    key = _scalar(f.message_type.fields_by_name["key"], rng)
                    value_field = f.message_type.fields_by_name["value"]
                    if value_field.type == f.TYPE_MESSAGE:
                        getattr(msg, f.name)[key].CopyFrom(_random_message(value_field.message_type, rng, depth + 1))
                    else:
                        getattr(msg, f.name)[key] = _scalar(value_field, rng)
                    continue
                sub = _random_message(f.message_type, rng, depth + 1)
                if repeated:
                    getattr(msg, f.name).add().CopyFrom(sub)
                else:
                    getattr(msg, f.name).CopyFrom(sub)
            else:
                v = _scalar(f, rng)
                if repeated:
                    getattr(msg, f.name).append(v)
                else:
                    setattr(msg, f.name, v)
    return msg


def _message_class(desc: pbd.Descriptor) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _scalar(f: pbd.FieldDescriptor, rng: random.Random) -> Any:
    t = f.type
    if t == f.TYPE_STRING:
        return rng.choice(["", "0" * 64, "../../etc/passwd", "\u2603" * rng.randrange(1, 50), "a" * 5000,
                           "busybox", "x:y@sha256:zz", "\x00", "/dev/null"])
    if t == f.TYPE_BYTES:
        return rng.randbytes(rng.randrange(0, 64))
    if t == f.TYPE_BOOL:
        return rng.random() < 0.5
    if t == f.TYPE_ENUM:
        return rng.choice([v.number for v in f.enum_type.values])
    if t in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63)])
    if t in (f.TYPE_UINT64, f.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1])
    if t in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
        return rng.choice([0, -1, 1, 2**31 - 1, -(2**31)])
    if t in (f.TYPE_UINT32, f.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    if t in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
        return rng.choice([0.0, -1.0, 1e308, float("inf")])
    return 0


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 2 and b:
            del b[rng.randrange(len(b)):]
        else:
            # A length-delimited field claiming far more bytes than follow.
            b += bytes([rng.randrange(1, 16) << 3 | 2, 0xFF, 0xFF, 0xFF, 0x7F])
    return bytes(b)


class Caller:
    def __init__(self, rt: Runtime) -> None:
        self.channel = rt.client.channel
        self.statuses: dict[str, int] = {}

    def call(self, path: str, method: pbd.MethodDescriptor, body: bytes) -> None:
        def ident(x: bytes) -> bytes:
            return x

        started = time.monotonic()
        if method.server_streaming:
            stream = self.channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)
            try:
                for _ in stream(body, timeout=2.0):
                    break
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            # An event stream left open until our deadline is a correct answer, not a hang.
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                code = grpc.StatusCode.OK
        else:
            fn = self.channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
            try:
                fn(body, timeout=CALL_TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert code not in BAD, f"{path} answered {code} ({e.details()}) to {body[:80]!r}"
        self.statuses[code.name] = self.statuses.get(code.name, 0) + 1
        assert time.monotonic() - started < CALL_TIMEOUT


@pytest.fixture
def caller(rt: Runtime) -> Caller:
    return Caller(rt)


def _alive(rt: Runtime) -> None:
    assert rt.proc.proc is not None and rt.proc.proc.poll() is None, rt.proc.log_tail()
    rt.client.runtime.Version(rt.pb.VersionRequest(), timeout=10)


def test_fuzz_grpc_requests(rt: Runtime, caller: Caller) -> None:
    @SETTINGS
    @given(idx=st.integers(0, len(METHODS) - 1), body=st.binary(max_size=300))
    def random_bytes(idx: int, body: bytes) -> None:
        path, m = METHODS[idx]
        caller.call(path, m, body)

    @SETTINGS
    @given(idx=st.integers(0, len(METHODS) - 1), rng=st.randoms(use_true_random=False))
    def mutated(idx: int, rng: random.Random) -> None:
        path, m = METHODS[idx]
        caller.call(path, m, _mutate(_seed(m), rng))

    @SETTINGS
    @given(idx=st.integers(0, len(METHODS) - 1), rng=st.randoms(use_true_random=False))
    def structured(idx: int, rng: random.Random) -> None:
        path, m = METHODS[idx]
        if m.name in NO_STRUCTURED:
            return
        caller.call(path, m, _random_message(m.input_type, rng).SerializeToString())

    random_bytes()
    _alive(rt)
    mutated()
    _alive(rt)
    structured()
    _alive(rt)
    # Every method got at least the seed request, well-formed, and answered it.
    for path, m in METHODS:
        caller.call(path, m, _seed(m))
    _alive(rt)
    print("fuzz statuses:", caller.statuses)
    crashed = [line for line in rt.proc.log_path.read_text(errors="replace").splitlines() if "rpc crashed" in line]
    assert not crashed, "unexpected exceptions answered INTERNAL:\n" + "\n".join(crashed[:10])


@SETTINGS
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=2048),
    st.binary(max_size=512).map(lambda b: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b),  # a preface, then garbage
    st.just(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
))
def test_raw_bytes_on_the_socket(rt: Runtime, junk: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(rt.proc.socket)
        try:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            # The server answers (GOAWAY, an HTTP/1 error) or closes; it never leaves us waiting.
            while s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
    _alive(rt)
