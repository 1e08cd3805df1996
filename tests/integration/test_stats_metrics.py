"""shimd's Prometheus endpoint on a real daemon: RPC counters, object gauges."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from tests.support.runtime import Runtime


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def test_metrics_endpoint_counts_rpcs_and_objects(metrics_rt: tuple[Runtime, str]) -> None:
    rt, url = metrics_rt
    try:
        _scrape(url)
    except urllib.error.URLError:
        pytest.skip("the daemon does not serve [metrics] yet (shimd.metrics.server.start_for_daemon not wired)")
    pod_id, pod_cfg = rt.run_pod("m")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "60"])
    rt.start(cid)
    deadline = time.monotonic() + 5
    while True:
        text = _scrape(url)
        if 'shimd_containers{handler="runc",state="RUNNING"} 1.0' in text or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert 'shimd_cri_requests_total{code="OK",method="RunPodSandbox"} 1.0' in text
    assert 'shimd_cri_requests_total{code="OK",method="PullImage"} 1.0' in text
    assert 'shimd_cri_request_duration_seconds_count{method="StartContainer"} 1.0' in text
    assert 'shimd_pods{handler="runc",state="READY"} 1.0' in text
    assert 'shimd_containers{handler="runc",state="RUNNING"} 1.0' in text
