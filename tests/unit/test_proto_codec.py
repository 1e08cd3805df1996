"""The CRI messages' codec: betterproto with its Rust (de)serializer (the `rust-codec` extra), held to
protobuf's own parser (grpcio's, generated from ../shared/protos as kubelet's client is)."""

from __future__ import annotations

import inspect
import io
import random
from typing import Any

import betterproto
import pytest

from shimd.api.runtime import v1 as cri
from tests.support.cri_client import modules

pb, _ = modules()


def test_the_rust_codec_is_in_use() -> None:
    # betterproto swaps it in for Message.parse and Message.__bytes__ when betterproto_rust_codec imports.
    import betterproto_rust_codec  # noqa: F401

    assert betterproto.Message.parse.__qualname__ == "__parse_patch"
    assert betterproto.Message.__bytes__.__qualname__ == "__bytes_patch"


def _pod_config() -> Any:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", namespace="default", uid="u-1", attempt=3),
        hostname="web", log_directory="/var/log/pods/x",
        dns_config=pb.DNSConfig(servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1")],
        labels={"app": "web", "empty": ""}, annotations={"a/b": "c" * 300},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod-u-1", sysctls={"net.ipv4.ip_forward": "1"},
            overhead=pb.LinuxContainerResources(cpu_shares=2),
            resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=-1, memory_limit_in_bytes=1 << 40,
                                                 unified={"memory.high": "max"},
                                                 hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4)]),
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.POD, ipc=pb.NODE,
                                                     userns_options=pb.UserNamespace(
                                                         mode=pb.POD, uids=[pb.IDMapping(host_id=65536, length=65536)],
                                                         gids=[pb.IDMapping(host_id=65536, length=65536)])),
                run_as_user=pb.Int64Value(value=0), run_as_group=pb.Int64Value(value=0),
                supplemental_groups=[1, 2, 2**40], readonly_rootfs=True, privileged=True,
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="/p.json"))))


def _create_request() -> Any:
    return pb.CreateContainerRequest(
        pod_sandbox_id="f" * 64, sandbox_config=_pod_config(),
        config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="c", attempt=1),
            image=pb.ImageSpec(image="busybox", annotations={"x": "y"}),
            command=["sh"], args=["-c", "echo ✓"], working_dir="/w",
            envs=[pb.KeyValue(key="A", value=b"1"), pb.KeyValue(key="B", value=b"\xff")],
            mounts=[pb.Mount(container_path="/d", host_path="/tmp", readonly=True, recursive_read_only=True,
                             propagation=pb.PROPAGATION_HOST_TO_CONTAINER, image=pb.ImageSpec(image="img"))],
            devices=[pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwm")],
            labels={"l": "v"}, annotations={"k": "v"}, log_path="c.log", stdin=True, stdin_once=True, tty=True,
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(cpu_shares=1024, oom_score_adj=-997, cpuset_cpus="0-1",
                                                     memory_swap_limit_in_bytes=-1),
                security_context=pb.LinuxContainerSecurityContext(
                    capabilities=pb.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]),
                    run_as_username="nobody", masked_paths=["/proc/kcore"], no_new_privs=True,
                    apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault))),
            CDI_devices=[pb.CDIDevice(name="vendor.com/gpu=0")]))


@pytest.mark.parametrize("name", ["create", "pod"])
def test_rich_messages_decode_and_encode_as_protobuf_does(name: str) -> None:
    ref = (_create_request() if name == "create"
           else pb.RunPodSandboxRequest(config=_pod_config(), runtime_handler="runsc"))
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
    bases = [_create_request().SerializeToString(), pb.RunPodSandboxRequest(config=_pod_config()).SerializeToString()]
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
