import betterproto

from shimd.api.runtime import v1 as cri
from shimd.cri import wire


def test_preencoded_list_decodes_like_the_real_message() -> None:
    items = [cri.Container(id=f"c{i}", pod_sandbox_id="p", metadata=cri.ContainerMetadata(name=f"n{i}"),
                           state=cri.ContainerState.CONTAINER_RUNNING, labels={"a": "b" * i}) for i in range(300)]
    cache = wire.EncodingCache(bytes, lambda c: c.state, lambda c: c.id)
    payload = wire.repeated_message_field(1, [cache.encoded(c) for c in items])
    msg = wire.preencoded(cri.ListContainersResponse, payload)
    assert isinstance(msg, cri.ListContainersResponse)
    assert msg.SerializeToString() == bytes(cri.ListContainersResponse(containers=items))
    assert cri.ListContainersResponse().parse(bytes(msg)).containers == items


def test_cache_reencodes_on_state_change_and_prunes() -> None:
    calls: list[str] = []

    def enc(c: cri.Container) -> bytes:
        calls.append(c.id)
        return bytes(c)

    cache = wire.EncodingCache(enc, lambda c: c.state, lambda c: c.id)
    c = cri.Container(id="x", state=cri.ContainerState.CONTAINER_CREATED)
    first = cache.encoded(c)
    assert cache.encoded(c) is first and calls == ["x"]
    c.state = cri.ContainerState.CONTAINER_RUNNING
    assert cache.encoded(c) != first and calls == ["x", "x"]
    cache.prune([])
    cache.encoded(c)
    assert calls == ["x", "x", "x"]


def test_submessage_tells_absent_from_present_without_building_defaults() -> None:
    absent = cri.ListContainersRequest().parse(b"")
    assert wire.submessage(absent, "filter") is None
    # The check itself must not leave a default filter behind (that is the work it saves).
    assert object.__getattribute__(absent, "filter") is betterproto.PLACEHOLDER

    empty_on_wire = cri.ListContainersRequest().parse(b"\x0a\x00")  # field 1, zero-length message
    assert isinstance(wire.submessage(empty_on_wire, "filter"), cri.ContainerFilter)

    by_pod = cri.ListContainersRequest().parse(bytes(cri.ListContainersRequest(
        filter=cri.ContainerFilter(pod_sandbox_id="p1"))))
    f = wire.submessage(by_pod, "filter")
    assert f is not None and f.pod_sandbox_id == "p1"

    built = cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(id="x"))
    assert wire.submessage(built, "filter").id == "x"
    assert wire.submessage(cri.ListPodSandboxRequest(), "filter") is None


def _request_types() -> list[type[betterproto.Message]]:
    from shimd.api.runtime.v1 import ImageServiceBase, RuntimeServiceBase

    out = []
    for base in (RuntimeServiceBase, ImageServiceBase):
        for handler in base.__mapping__(object.__new__(base)).values():
            out.append(handler.request_type)
    return out


def test_empty_is_what_the_library_decodes_from_an_empty_body() -> None:
    types = _request_types()
    assert len(types) > 30
    for cls in [*types, cri.ContainerConfig, cri.PodSandboxConfig, cri.LinuxContainerResources]:
        ours, theirs = wire.empty(cls), cls.FromString(b"")
        assert type(ours) is cls
        assert object.__getattribute__(ours, "__dict__") == object.__getattribute__(theirs, "__dict__"), cls
        assert ours == theirs and bytes(ours) == bytes(theirs) == b""
        assert ours.to_dict() == theirs.to_dict()


def test_empty_messages_share_no_state() -> None:
    a = wire.empty(cri.ListContainersRequest)
    a.filter.id = "x"
    b = wire.empty(cri.ListContainersRequest)
    assert wire.submessage(b, "filter") is None and b.filter.id == ""
    one = wire.empty(cri.PullImageRequest)
    one.image.annotations["k"] = "v"
    assert wire.empty(cri.PullImageRequest).image.annotations == {}
    # A oneof's current member is per instance.
    c = wire.empty(cri.StreamPodSandboxesRequest)
    assert object.__getattribute__(c, "_group_current") is not object.__getattribute__(
        wire.empty(cri.StreamPodSandboxesRequest), "_group_current")


def test_without_fields_leaves_out_only_those_fields() -> None:
    import random

    from tests.support.cri_client import modules
    from tests.support.cri_samples import create_request

    pb, _ = modules()
    full = create_request(pb)
    data = full.SerializeToString()
    want = pb.CreateContainerRequest()
    want.CopyFrom(full)
    want.ClearField("sandbox_config")
    cut = wire.without_fields(data, frozenset({3}))
    assert len(cut) < len(data) and pb.CreateContainerRequest.FromString(cut) == want
    assert cri.CreateContainerRequest().parse(cut) == cri.CreateContainerRequest().parse(want.SerializeToString())
    twice = data + data  # a field repeated on the wire: every occurrence goes
    assert pb.CreateContainerRequest.FromString(wire.without_fields(twice, frozenset({3}))) == \
        pb.CreateContainerRequest.FromString(want.SerializeToString() * 2)
    plain = want.SerializeToString()
    assert wire.without_fields(plain, frozenset({3})) is plain  # nothing to leave out: the same bytes

    # Damaged bytes: never an exception here (the decoder judges them); what is changed only lost field 3.
    rnd = random.Random(3)
    for _ in range(3000):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(len(b))
            if rnd.random() < 0.5:
                b[pos] = rnd.randrange(256)
            else:
                del b[pos:pos + rnd.randint(1, 3)]
        out = wire.without_fields(bytes(b), frozenset({3}))
        if out == bytes(b):
            continue
        try:
            ref = pb.CreateContainerRequest.FromString(bytes(b))
        except Exception:
            continue  # damaged inside the field left out, or beyond the decoder's tolerance: not compared
        ref.ClearField("sandbox_config")
        assert pb.CreateContainerRequest.FromString(out) == ref, bytes(b).hex()
