"""The CRI messages' codec: betterproto with its Rust (de)serializer (the `rust-codec` extra), held to
protobuf's own parser (grpcio's, generated from ../shared/protos as kubelet's client is)."""

from __future__ import annotations

import inspect
import io
import random

import betterproto
import pytest

from shimd.api.runtime import v1 as cri
from tests.support.cri_client import modules
from tests.support.cri_samples import create_request, pod_config

pb, _ = modules()


def test_the_rust_codec_is_in_use() -> None:
    # betterproto swaps it in for Message.parse and Message.__bytes__ when betterproto_rust_codec imports.
    import betterproto_rust_codec  # noqa: F401

    assert betterproto.Message.parse.__qualname__ == "__parse_patch"
    assert betterproto.Message.__bytes__.__qualname__ == "__bytes_patch"


@pytest.mark.parametrize("name", ["create", "pod"])
def test_rich_messages_decode_and_encode_as_protobuf_does(name: str) -> None:
    ref = (create_request(pb) if name == "create"
           else pb.RunPodSandboxRequest(config=pod_config(pb), runtime_handler="runsc"))
    cls = cri.CreateContainerRequest if name == "create" else cri.RunPodSandboxRequest
    data = ref.SerializeToString()
    msg = cls().parse(data)
    assert msg == _pure_parse(cls, data) and msg.to_dict() == _pure_parse(cls, data).to_dict()
    assert type(ref).FromString(bytes(msg)) == ref
    # Unknown fields (a newer client's) are skipped, as protobuf skips them.
    unknown = bytes([0xB8, 0x3E, 0x01, 0xBA, 0x3E, 0x02]) + b"hi"  # field 999 as a varint, then as bytes
    assert cls().parse(data + unknown).to_dict() == msg.to_dict()


def _pure_parse(cls: type[betterproto.Message], data: bytes) -> betterproto.Message:
    """betterproto's pure-Python decoder (what Message.parse runs without the codec)."""
    with io.BytesIO(data) as stream:
        return cls().load(stream)


def _mutated(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        pos = rnd.randrange(len(b)) if b else 0
        op = rnd.random()
        if op < 0.45 and b:
            b[pos] = rnd.randrange(256)
        elif op < 0.75:
            b.insert(pos, rnd.randrange(256))
        elif op < 0.9 and b:
            del b[pos]
        else:
            del b[pos:]
    return bytes(b)


def test_hostile_bytes_are_refused_with_an_exception_and_never_accepted_where_protobuf_refuses() -> None:
    """A request the reference parser rejects is rejected; what is accepted re-encodes to what the reference
    reads from the same bytes; and a refusal is an Exception (the dispatcher's INVALID_ARGUMENT), never a
    Rust panic (a BaseException, which would escape every handler)."""
    requests = {n: c for n, c in inspect.getmembers(cri, inspect.isclass)
                if issubclass(c, betterproto.Message) and n.endswith("Request") and hasattr(pb, n)}
    bases = [create_request(pb).SerializeToString(), pb.RunPodSandboxRequest(config=pod_config(pb)).SerializeToString()]
    rnd = random.Random(18)
    accepted = refused = 0
    for _ in range(3000):
        name = rnd.choice(sorted(requests))
        data = _mutated(rnd.choice(bases), rnd) if rnd.random() < 0.8 else rnd.randbytes(rnd.randint(0, 48))
        try:
            msg = requests[name]().parse(data)
        except Exception:
            refused += 1
            continue
        accepted += 1
        ref = getattr(pb, name).FromString(data)  # must not raise: the reference accepts what we accept
        assert getattr(pb, name).FromString(bytes(msg)) == ref, (name, data.hex())
        assert msg == _pure_parse(requests[name], data), (name, data.hex())
    assert accepted > 50 and refused > 1000, (accepted, refused)
