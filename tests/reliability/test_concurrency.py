"""Many RunPodSandbox at once; the same pod name from two clients at once has exactly one winner.

SHIMD_PARALLEL_PODS sets the burst size (30 in `make test`, 100 in `make soak`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from tests.support.cri_client import CriClient
from tests.support.reliability import Checker, explain
from tests.support.runtime import Runtime

PARALLEL = int(os.environ.get("SHIMD_PARALLEL_PODS", "30"))
RACES = 5


def _remove_all(rt: Runtime, pool: ThreadPoolExecutor) -> None:
    pb = rt.pb

    def rm(pod_id: str) -> None:
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

    ids = [p.id for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items]
    list(pool.map(rm, ids))


def test_parallel_pods_and_name_races(rt: Runtime) -> None:
    pb = rt.pb
    checker = Checker(rt)
    with ThreadPoolExecutor(max_workers=min(PARALLEL, 64)) as pool:
        # A burst of pods, each with one container, all at once.
        def run(i: int) -> tuple[str, str]:
            pod_id, cfg = rt.run_pod(f"burst{i}")
            cid = rt.create(pod_id, cfg, "main", ["sleep", "1000"])
            rt.start(cid)
            return pod_id, cid

        results = list(pool.map(run, range(PARALLEL)))
        assert len({p for p, _ in results}) == PARALLEL
        listed = rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert len(listed) == PARALLEL and all(p.state == pb.SANDBOX_READY for p in listed)
        running = rt.client.runtime.ListContainers(pb.ListContainersRequest(
            filter=pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)))).containers
        assert {c.id for c in running} == {c for _, c in results}
        # Distinct pods got distinct namespaces (no sharing by accident under load).
        pins = os.listdir(rt.proc.state / "ns")
        assert len(pins) == PARALLEL
        problems = checker.check()
        assert not problems, explain(rt, problems)

        # Two independent clients ask for the same pod name at the same instant.
        clients = [CriClient(rt.proc.socket) for _ in range(2)]
        try:
            for race in range(RACES):
                cfg = rt.pod_config(f"race{race}")
                barrier = threading.Barrier(2)

                def attempt(c: CriClient, cfg: Any = cfg, barrier: threading.Barrier = barrier) -> Any:
                    barrier.wait(timeout=10)
                    try:
                        return c.runtime.RunPodSandbox(c.pb.RunPodSandboxRequest(config=cfg), timeout=60)
                    except grpc.RpcError as e:
                        return e

                outcomes = list(pool.map(attempt, clients))
                wins = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
                losses = [o for o in outcomes if isinstance(o, grpc.RpcError)]
                assert len(wins) == 1, outcomes
                assert losses[0].code() == grpc.StatusCode.ALREADY_EXISTS, losses[0].details()
                assert wins[0].pod_sandbox_id in losses[0].details()  # the loser is told who holds the name
        finally:
            for c in clients:
                c.close()
        named = [p for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
                 if p.metadata.name.startswith("race")]
        assert len(named) == RACES

        _remove_all(rt, pool)
    problems = checker.check_empty()
    assert not problems, explain(rt, problems)
