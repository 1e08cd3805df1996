"""Prometheus endpoint: RPC counters and latency, object gauges from the store, pull and shim counters."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from shimd.config import ConfigError, parse
from shimd.metrics.server import start_for_daemon
from shimd.store.records import ContainerRecord, PodRecord
from shimd.store.store import Store


async def test_metrics_endpoint(tmp_path: Path) -> None:
    store = Store(tmp_path)
    await store.load()
    await store.add_pod(PodRecord(id="p1", name="n", namespace="ns", uid="u", attempt=0, handler="runc",
                                   created_at=1, config={}, state="READY"))
    await store.add_container(ContainerRecord(id="c1", pod_id="p1", name="c", attempt=0, created_at=1, config={},
                                               image_ref="i", image_id="i", log_path="", bundle="",
                                               state="RUNNING"))
    server = await start_for_daemon("127.0.0.1:0", lambda: store)
    try:
        m = server.metrics
        m.observe_rpc("ListPodSandbox", "OK", 0.002)
        m.observe_rpc("PullImage", "NOT_FOUND", 0.5)
        m.record_pull(12345, 1.5)
        m.record_shim_death("runc")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    finally:
        await server.close()
    assert 'shimd_cri_requests_total{code="OK",method="ListPodSandbox"} 1.0' in text
    assert 'shimd_cri_request_duration_seconds_bucket{le="0.0025",method="ListPodSandbox"} 1.0' in text
    assert 'shimd_pods{handler="runc",state="READY"} 1.0' in text
    assert 'shimd_containers{handler="runc",state="RUNNING"} 1.0' in text
    assert "shimd_image_pull_bytes_total 12345.0" in text
    assert "shimd_image_pull_failures_total 1.0" in text
    assert 'shimd_shim_deaths_total{handler="runc"} 1.0' in text


async def test_metrics_off_by_default() -> None:
    cfg = parse({})
    assert cfg.metrics.address == ""
    server = await start_for_daemon(cfg.metrics.address, lambda: None)
    assert server.port == 0
    await server.close()


def test_metrics_address_validated() -> None:
    try:
        parse({"metrics": {"address": "nope"}})
    except ConfigError as e:
        assert "metrics.address" in str(e)
    else:
        raise AssertionError("bad metrics.address accepted")
