"""shimd/cri/summary_wire.py writes exactly what betterproto writes for convert's summaries."""

from __future__ import annotations

import dataclasses
import random

from shimd.api.runtime import v1 as cri
from shimd.cri import convert, summary_wire
from shimd.store.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_INITIALIZING,
    POD_NOTREADY,
    POD_READY,
    POD_STOPPED,
    ContainerRecord,
    PodRecord,
)

_TEXTS = ["", "a", "busybox", "ünïcødé ✓", "x" * 200, "k8s.io/app=web", "\x00nul"]


def _text(rnd: random.Random) -> str:
    return rnd.choice(_TEXTS)


def _strings(rnd: random.Random) -> dict[str, str]:
    return {_text(rnd) + str(i): _text(rnd) for i in range(rnd.choice([0, 1, 3]))} | (
        {"": "empty key"} if rnd.random() < 0.2 else {})


def _container(rnd: random.Random) -> ContainerRecord:
    image: dict[str, object] = {}
    if rnd.random() < 0.5:
        image["annotations"] = _strings(rnd)
    if rnd.random() < 0.5:
        image["userSpecifiedImage"] = _text(rnd)
    return ContainerRecord(
        id=f"{rnd.getrandbits(256):064x}", pod_id=rnd.choice(["", f"{rnd.getrandbits(256):064x}"]),
        name=_text(rnd), attempt=rnd.choice([0, 1, 127, 128, 2**32 - 1]),
        created_at=rnd.choice([0, 1, 1_795_932_793_230_921_154, -5]),
        config={"image": image} if image or rnd.random() < 0.5 else {},
        image_ref=_text(rnd), image_id=rnd.choice(["", "sha256:" + "c" * 64]), log_path="", bundle="",
        labels=_strings(rnd), annotations=_strings(rnd),
        state=rnd.choice([CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED, "unknown"]),
    )


def _pod(rnd: random.Random) -> PodRecord:
    return PodRecord(
        id=f"{rnd.getrandbits(256):064x}", name=_text(rnd), namespace=_text(rnd), uid=_text(rnd),
        attempt=rnd.choice([0, 3, 300]), handler=rnd.choice(["", "runc", "runsc"]),
        created_at=rnd.choice([0, 1_795_932_793_230_921_154]), config={},
        labels=_strings(rnd), annotations=_strings(rnd),
        state=rnd.choice([POD_INITIALIZING, POD_READY, POD_NOTREADY, POD_STOPPED]),
    )


def test_container_summary_bytes_match_betterproto() -> None:
    for seed in range(300):
        ctr = _container(random.Random(seed))
        assert summary_wire.container(ctr) == bytes(convert.container_summary(ctr)), f"seed {seed}: {ctr}"


def test_pod_summary_bytes_match_betterproto() -> None:
    for seed in range(100):
        pod = _pod(random.Random(seed))
        assert summary_wire.pod(pod) == bytes(convert.pod_summary(pod)), f"seed {seed}: {pod}"


def test_encoding_decodes_to_the_record() -> None:
    ctr = dataclasses.replace(_container(random.Random(7)), labels={"app": "web", "tier": ""},
                              state=CONTAINER_RUNNING, created_at=-5)
    decoded = cri.Container().parse(summary_wire.container(ctr))
    assert (decoded.id, decoded.labels, decoded.created_at) == (ctr.id, {"app": "web", "tier": ""}, -5)
    assert decoded.state == cri.ContainerState.CONTAINER_RUNNING
