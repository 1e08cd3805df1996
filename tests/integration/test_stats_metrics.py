"""shimd's Prometheus endpoint on a real daemon: RPC counters, object gauges."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.runtime import Runtime, runtime_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metrics_rt(shimd_factory: Callable[..., Any], busybox_registry: tuple[str, str],
               cni_loopback_dir: Path) -> Iterator[tuple[Runtime, str]]:
    host, ref = busybox_registry
    port = _free_port()
    proc = shimd_factory(runtime_config(host, cni_loopback_dir) + f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    proc.start()
    rt = Runtime(proc, ref)
    try:
        rt.client.images.PullImage(rt.pb.PullImageRequest(image=rt.pb.ImageSpec(image=ref)))
        yield rt, f"http://127.0.0.1:{port}/metrics"
    finally:
        rt.cleanup()


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
