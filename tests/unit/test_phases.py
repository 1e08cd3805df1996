"""shimd/phases.py: per-call phase timing carried in a context variable."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from shimd import phases
from shimd.metrics.registry import Metrics


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, float]]]:
    seen: list[tuple[str, dict[str, float]]] = []
    monkeypatch.setattr(phases, "_observers", [lambda rpc, steps: seen.append((rpc, dict(steps)))])
    return seen


def test_phases_add_up_and_repeat_names_accumulate(observed: list[tuple[str, dict[str, float]]]) -> None:
    token = phases.begin("RunPodSandbox")
    assert token is not None
    phases.phase_context(pod_id="p1")
    time.sleep(0.002)
    phases.phase("namespaces")
    phases.phase("record_write")
    time.sleep(0.002)
    phases.phase("record_write")
    with capture_logs() as logs:
        phases.end(token, "OK")
    [(rpc, steps)] = observed
    assert rpc == "RunPodSandbox"
    assert list(steps) == ["namespaces", "record_write", phases.OTHER]
    assert steps["namespaces"] >= 0.002 and steps["record_write"] >= 0.002
    [line] = [e for e in logs if e["event"] == "rpc phases"]
    assert line["log_level"] == "debug" and line["rpc"] == "RunPodSandbox" and line["status"] == "OK"
    assert line["pod_id"] == "p1"
    assert list(line["phases"]) == list(steps)
    # The breakdown is the whole call: the phases add up to its total.
    assert sum(line["phases"].values()) == pytest.approx(line["total_ms"], abs=0.01)


def test_failed_calls_are_logged_but_not_observed(observed: list[tuple[str, dict[str, float]]]) -> None:
    token = phases.begin("StartContainer")
    phases.phase("runtime_create")
    with capture_logs() as logs:
        phases.end(token, "FAILED_PRECONDITION")
    assert observed == []
    assert [e["status"] for e in logs if e["event"] == "rpc phases"] == ["FAILED_PRECONDITION"]


def test_untimed_calls_and_code_outside_a_call(observed: list[tuple[str, dict[str, float]]]) -> None:
    assert phases.begin("ListPodSandbox") is None
    phases.phase("anything")  # no current call: nothing happens
    phases.phase_context(pod_id="x")
    with capture_logs() as logs:
        phases.end(None, "OK")
    assert observed == [] and logs == []


async def test_tasks_share_the_call_and_stop_marking_when_it_ends(
        observed: list[tuple[str, dict[str, float]]]) -> None:
    later = asyncio.Event()

    async def cni_chain() -> None:  # like the CNI chain, run in a task of its own
        phases.phase("cni_add:bridge")

    async def watcher() -> None:  # like an exit watcher that outlives the call
        await later.wait()
        phases.phase("after_the_call")

    async def call() -> asyncio.Task[None]:
        token = phases.begin("RunPodSandbox")
        await asyncio.ensure_future(cni_chain())
        w = asyncio.create_task(watcher())
        phases.phase("cni_record")
        phases.end(token, "OK")
        return w

    w = await call()
    later.set()
    await asyncio.wait_for(w, 5)
    [(_, steps)] = observed
    assert list(steps) == ["cni_add:bridge", "cni_record", phases.OTHER]


async def test_concurrent_calls_keep_their_own_phases(observed: list[tuple[str, dict[str, float]]]) -> None:
    async def call(rpc: str, name: str) -> None:
        token = phases.begin(rpc)
        await asyncio.sleep(0)
        phases.phase(name)
        await asyncio.sleep(0)
        phases.end(token, "OK")

    await asyncio.gather(call("RunPodSandbox", "a"), call("StopPodSandbox", "b"))
    assert sorted((rpc, list(steps)) for rpc, steps in observed) == [
        ("RunPodSandbox", ["a", phases.OTHER]), ("StopPodSandbox", ["b", phases.OTHER])]


def test_histogram_on_the_metrics_registry() -> None:
    m = Metrics(lambda: None)
    m.observe_phases("StartContainer", {"runtime_create": 0.02, "runtime_start": 0.004})
    m.observe_phases("StartContainer", {"runtime_create": 0.03})
    text = generate_latest(m.registry).decode()
    assert 'shimd_phase_duration_seconds_count{phase="runtime_create",rpc="StartContainer"} 2.0' in text
    assert 'shimd_phase_duration_seconds_sum{phase="runtime_start",rpc="StartContainer"} 0.004' in text
    assert 'shimd_phase_duration_seconds_bucket{le="0.025",phase="runtime_create",rpc="StartContainer"} 1.0' in text


def test_intervals_are_kept_for_tracing_with_the_side_branch_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "_record_intervals", False)
    token = phases.begin("StopPodSandbox")
    phases.phase("lock_wait")
    assert phases.end(token, "OK").intervals is None  # type: ignore[union-attr]  # off unless tracing is on

    monkeypatch.setattr(phases, "_record_intervals", True)

    async def call() -> phases.Phases:
        token = phases.begin("StopPodSandbox")

        async def branch() -> None:
            with phases.side_branch():
                await asyncio.sleep(0.003)
                phases.phase("cni_del:bridge")

        side = asyncio.create_task(branch())
        await asyncio.sleep(0.001)
        phases.phase("stop_containers")
        await side
        phases.phase("cni_wait")
        ended = phases.end(token, "OK")
        assert ended is not None
        return ended

    timed = asyncio.run(call())
    assert timed.intervals is not None
    names = [(name, overlapped) for name, _, _, overlapped in timed.intervals]
    assert names == [("stop_containers", False), ("cni_del:bridge", True), ("cni_wait", False), (phases.OTHER, False)]
    main = [(b, e) for _, b, e, o in timed.intervals if not o]
    assert main[0][0] == timed.started and all(a[1] == b[0] for a, b in itertools.pairwise(main))
    (_, began, ended, _), = [i for i in timed.intervals if i[3]]
    assert began >= timed.started and ended - began >= 0.003
    assert phases.end(None, "OK") is None  # an untimed call
