"""GetContainerEvents: the lifecycle event stream kubelet's Evented PLEG reads."""

from __future__ import annotations

from collections.abc import AsyncIterator

from shimd import errors, events
from shimd.api.runtime import v1 as cri
from shimd.cri import convert
from shimd.cri.rpc_base import RpcBase
from shimd.events import LifecycleEvent, SubscriberOverflow

# Events a GetContainerEvents subscriber may lag behind before it is cut off (and reconnects).
EVENT_BUFFER = 1024
EVENT_IDLE = 30.0
POD_STATUS_MEMORY = 1024

_EVENT_TYPES = {
    events.CREATED: cri.ContainerEventType.CONTAINER_CREATED_EVENT,
    events.STARTED: cri.ContainerEventType.CONTAINER_STARTED_EVENT,
    events.STOPPED: cri.ContainerEventType.CONTAINER_STOPPED_EVENT,
    events.DELETED: cri.ContainerEventType.CONTAINER_DELETED_EVENT,
}


class EventRpcs(RpcBase):
    # --- lifecycle events (Evented PLEG) ------------------------------------------------------
    async def get_container_events(self, request: cri.GetEventsRequest) -> AsyncIterator[cri.ContainerEventResponse]:
        sub = self.d.events.subscribe(EVENT_BUFFER)
        try:
            while True:
                try:
                    ev = await sub.get(timeout=EVENT_IDLE)
                except TimeoutError:
                    continue  # idle; the wait is bounded so cancellation and shutdown are never stuck
                except SubscriberOverflow as e:
                    raise errors.ResourceExhausted(f"GetContainerEvents: {e}") from None
                yield self._event_response(ev)
        finally:
            sub.close()

    def _remember_pod(self, ev: LifecycleEvent) -> None:
        """Runs at publish time, before a removal makes the pod's record disappear."""
        if not self.d.events.subscribed:
            return  # the status is only read when a subscriber's event is answered after the pod is gone
        pod = self.d.store.pods.get(ev.pod_id) if self.d.store is not None else None
        if pod is None:
            return
        # Encoded: a tenth of the memory of the message objects, and it is parsed only for removed pods.
        self._last_pod_status[pod.id] = bytes(convert.pod_status(pod))
        self._last_pod_status.move_to_end(pod.id)
        while len(self._last_pod_status) > POD_STATUS_MEMORY:
            self._last_pod_status.popitem(last=False)

    def _event_response(self, ev: LifecycleEvent) -> cri.ContainerEventResponse:
        pod = self.d.store.pods.get(ev.pod_id)
        if pod is not None:
            status = convert.pod_status(pod)
            ctrs = [self._container_status(c) for c in self.d.store.pod_containers(pod.id)]
        else:
            # A removed pod: the status last seen, marked not ready (kubelet needs its metadata).
            last = self._last_pod_status.get(ev.pod_id)
            status = cri.PodSandboxStatus(id=ev.pod_id) if last is None else cri.PodSandboxStatus().parse(last)
            status.state = cri.PodSandboxState.SANDBOX_NOTREADY
            ctrs = []
        return cri.ContainerEventResponse(container_id=ev.container_id, container_event_type=_EVENT_TYPES[ev.kind],
                                          created_at=ev.at_ns, pod_sandbox_status=status,
                                          containers_statuses=ctrs)
