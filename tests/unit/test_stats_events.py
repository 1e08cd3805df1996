"""GetContainerEvents handler: ordering, several subscribers, and the bounded buffer of a slow one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from shimd import errors, events
from shimd.api.runtime import v1 as cri
from shimd.cri.rpc_events import EVENT_BUFFER
from shimd.cri.runtime_service import RuntimeService
from shimd.store.records import PodRecord
from shimd.store.store import Store


async def _service(tmp_path: Path) -> tuple[RuntimeService, events.EventBus, Store]:
    store = Store(tmp_path)
    await store.load()
    bus = events.EventBus()
    d = SimpleNamespace(events=bus, store=store, images=SimpleNamespace(get=lambda _id: None))
    return RuntimeService(d), bus, store  # type: ignore[arg-type]


async def test_events_in_order_to_each_subscriber(tmp_path: Path) -> None:
    svc, bus, store = await _service(tmp_path)
    pod = PodRecord(id="p1", name="n", namespace="ns", uid="u1", attempt=0, handler="runc", created_at=1, config={})
    await store.add_pod(pod)
    streams = [svc.get_container_events(cri.GetEventsRequest()) for _ in range(2)]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    await asyncio.sleep(0)  # both handlers subscribe
    bus.publish(events.CREATED, "p1", "p1")
    bus.publish(events.STARTED, "c1", "p1")
    await store.delete_pod(pod.id)
    bus.publish(events.DELETED, "p1", "p1")
    for s, first in zip(streams, firsts, strict=True):
        got = [await first, await s.__anext__(), await s.__anext__()]
        assert [(e.container_id, e.container_event_type) for e in got] == [
            ("p1", cri.ContainerEventType.CONTAINER_CREATED_EVENT),
            ("c1", cri.ContainerEventType.CONTAINER_STARTED_EVENT),
            ("p1", cri.ContainerEventType.CONTAINER_DELETED_EVENT)]
        # The removed pod still has its metadata (remembered from the earlier events).
        assert got[2].pod_sandbox_status.metadata.uid == "u1"
        assert got[2].pod_sandbox_status.state == cri.PodSandboxState.SANDBOX_NOTREADY
        await s.aclose()
    assert not bus._subs  # closing the stream unsubscribes


async def test_slow_subscriber_is_cut_off_not_buffered(tmp_path: Path) -> None:
    svc, bus, _ = await _service(tmp_path)
    stream = svc.get_container_events(cri.GetEventsRequest())
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    for i in range(EVENT_BUFFER * 3):
        bus.publish(events.CREATED, f"c{i}", "p")
    # Cut off at once (the subscriber relists after reconnecting), and nothing is held for it any more.
    with pytest.raises(errors.ResourceExhausted, match="resubscribe"):
        await first
    assert not bus._subs
