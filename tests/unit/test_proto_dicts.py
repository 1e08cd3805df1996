"""shimd.api.dicts.to_dict against betterproto's own Message.to_dict, the reference it stands in for."""

from __future__ import annotations

import inspect
import random

import betterproto

from shimd.api import dicts
from shimd.api.runtime import v1 as cri
from tests.support.cri_client import modules
from tests.support.cri_samples import create_request, pod_config

pb, _ = modules()
MESSAGES = [c for _, c in inspect.getmembers(cri, inspect.isclass) if issubclass(c, betterproto.Message)]


def test_every_cri_message_empty_and_filled() -> None:
    rich = [cri.CreateContainerRequest().parse(create_request(pb).SerializeToString()),
            cri.RunPodSandboxRequest().parse(pb.RunPodSandboxRequest(config=pod_config(pb)).SerializeToString())]
    for msg in [cls() for cls in MESSAGES] + [cls().parse(b"") for cls in MESSAGES] + rich:
        assert dicts.to_dict(msg) == msg.to_dict(), type(msg).__name__
    assert dicts.to_dict(rich[0])["config"]["envs"][1] == {"key": "B", "value": "/w=="}  # bytes as base64
    # Set by hand, not decoded: a nested message set to its default still counts as set.
    msg = cri.ContainerConfig(metadata=cri.ContainerMetadata(), linux=cri.LinuxContainerConfig(
        resources=cri.LinuxContainerResources(cpu_quota=-1, hugepage_limits=[cri.HugepageLimit()])))
    assert dicts.to_dict(msg) == msg.to_dict()


def test_decoded_from_mutated_requests() -> None:
    """Whatever the decoder makes of damaged bytes (odd field mixes, repeated messages, maps) reads alike."""
    bases = [create_request(pb).SerializeToString(), pb.RunPodSandboxRequest(config=pod_config(pb)).SerializeToString()]
    rnd = random.Random(7)
    checked = 0
    for _ in range(5000):
        b = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randrange(len(b))
            b[pos] = rnd.randrange(256) if rnd.random() < 0.6 else b[pos]
            if rnd.random() < 0.3:
                del b[pos]
        cls = rnd.choice([cri.CreateContainerRequest, cri.RunPodSandboxRequest, cri.ContainerConfig,
                          cri.PodSandboxConfig])
        try:
            msg = cls().parse(bytes(b))
            want = msg.to_dict()
        except Exception:
            continue
        assert dicts.to_dict(msg) == want, (cls.__name__, bytes(b).hex())
        checked += 1
    assert checked > 250, checked


def test_messages_it_does_not_plan_go_to_betterproto() -> None:
    psi = cri.PsiData(total=5, avg10=1.5)  # doubles: betterproto's own float format
    assert dicts.to_dict(psi) == psi.to_dict()
    assert dicts._plans[cri.PsiData] is None
