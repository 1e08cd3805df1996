"""GetContainerEvents: the stream kubelet's Evented PLEG reads, over a full pod lifecycle."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc

from tests.support.runtime import Runtime


class _Reader:
    """Reads one GetContainerEvents stream in a thread into a queue."""

    def __init__(self, rt: Runtime) -> None:
        self.call = rt.client.runtime.GetContainerEvents(rt.pb.GetEventsRequest())
        self.q: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.call:
                self.q.put(ev)
        except grpc.RpcError as e:
            self.q.put(e)

    def take(self, n: int, timeout: float = 10.0) -> list[Any]:
        return [self.q.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)


def test_events_full_lifecycle_two_subscribers(rt: Runtime) -> None:
    pb = rt.pb
    a, b = _Reader(rt), _Reader(rt)
    try:
        # The subscription exists once the server has started handling the call (no ack in the protocol).
        time.sleep(0.5)
        pod_id, pod_cfg = rt.run_pod("ev")
        cid = rt.create(pod_id, pod_cfg, "c", ["sh", "-c", "exit 0"])
        rt.start(cid)
        rt.wait_state(cid, pb.CONTAINER_EXITED)
        rt.client.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

        want = [(pod_id, pb.CONTAINER_CREATED_EVENT), (pod_id, pb.CONTAINER_STARTED_EVENT),
                (cid, pb.CONTAINER_CREATED_EVENT), (cid, pb.CONTAINER_STARTED_EVENT),
                (cid, pb.CONTAINER_STOPPED_EVENT), (cid, pb.CONTAINER_DELETED_EVENT),
                (pod_id, pb.CONTAINER_STOPPED_EVENT), (pod_id, pb.CONTAINER_DELETED_EVENT)]
        for reader in (a, b):
            got = reader.take(len(want))
            assert [(e.container_id, e.container_event_type) for e in got] == want
            times = [e.created_at for e in got]
            assert times == sorted(times)
            for e in got:
                # Every event carries the pod's identity, even after the pod is gone.
                assert e.pod_sandbox_status.id == pod_id
                assert e.pod_sandbox_status.metadata.uid == "uid-ev"
            started = got[3]
            assert [c.id for c in started.containers_statuses] == [cid]
            assert started.containers_statuses[0].state in (pb.CONTAINER_RUNNING, pb.CONTAINER_EXITED)
            assert got[4].containers_statuses[0].state == pb.CONTAINER_EXITED
            assert got[-1].pod_sandbox_status.state == pb.SANDBOX_NOTREADY
    finally:
        a.close()
        b.close()
