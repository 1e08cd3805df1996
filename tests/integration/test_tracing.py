"""Issue 18 item 1, OpenTelemetry: with [tracing] endpoint set, every CRI call is a span exported over
OTLP/HTTP, a child of the trace context the client sent (as kubelet sends it), with a child span per
phase for the pod and container lifecycle calls. A real daemon (runc, CNI, registry) is driven through
the grpcio client; the spans are read by an OTLP/HTTP endpoint in this test and decoded with
OpenTelemetry's own protobuf definitions."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.support.daemon import ShimdProcess
from tests.support.otlp import Collector, attributes
from tests.support.runtime import Runtime, started_runtime

RUNTIME = "runtime.v1.RuntimeService"


@pytest.fixture
def traced(shimd_factory: Callable[..., ShimdProcess], busybox_registry: tuple[str, str], cni_loopback_dir: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Runtime, Collector]]:
    # The SDK's batch processor exports every 5 s by default; its own setting makes the test quicker.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    collector = Collector()
    try:
        with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir,
                             f'[tracing]\nendpoint = "http://127.0.0.1:{collector.port}"\n') as runtime:
            yield runtime, collector
    finally:
        collector.close()


def _traceparent(trace_id: str, span_id: str, sampled: bool = True) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"), ("tracestate", "k8s=1"))


def test_cri_calls_are_spans_under_the_clients_trace_with_phase_children(traced: tuple[Runtime, Collector]) -> None:
    rt, collector = traced
    pb = rt.pb
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    cfg = rt.pod_config("traced")
    pod_id = rt.client.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg),
                                            metadata=_traceparent(trace_id, parent_id)).pod_sandbox_id
    cid = rt.create(pod_id, cfg, "c", ["sleep", "3600"])  # no trace context: a trace of its own
    rt.start(cid)
    missing_trace = secrets.token_hex(16)
    with pytest.raises(grpc.RpcError) as err:
        rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="0" * 64),
                                           metadata=_traceparent(missing_trace, secrets.token_hex(8)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    unsampled_trace = secrets.token_hex(16)
    rt.client.runtime.Version(pb.VersionRequest(), metadata=_traceparent(unsampled_trace, secrets.token_hex(8),
                                                                         sampled=False))

    (run,) = collector.until(lambda s: s.name == f"{RUNTIME}/RunPodSandbox", "for RunPodSandbox")
    assert run.trace_id.hex() == trace_id and run.parent_span_id.hex() == parent_id
    assert run.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert run.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    attrs = attributes(run)
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.service"] == RUNTIME
    assert attrs["rpc.method"] == "RunPodSandbox" and attrs["rpc.grpc.status_code"] == 0
    assert attrs["shimd.pod_id"] == pod_id
    # A child span for each phase, inside the call's own time; the CNI ADD runs alongside the main line.
    phases = collector.until(lambda s: s.parent_span_id == run.span_id and s.name == "other", "for its last phase")
    children = collector.find(lambda s: s.parent_span_id == run.span_id)
    names = {c.name for c in children}
    assert {"validate", "namespaces", "shim_launch", "cni_add:loopback", "other"} <= names, names
    assert all(c.trace_id == run.trace_id for c in children)
    assert all(run.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano <= run.end_time_unix_nano
               for c in children)
    by_name = {c.name: c for c in children}
    assert attributes(by_name["cni_add:loopback"]).get("shimd.overlapped") is True
    assert "shimd.overlapped" not in attributes(by_name["shim_launch"])
    assert phases

    (create,) = collector.until(lambda s: s.name == f"{RUNTIME}/CreateContainer", "for CreateContainer")
    assert create.trace_id.hex() != trace_id and not create.parent_span_id
    assert attributes(create)["shimd.container_id"] == cid

    (failed,) = collector.until(lambda s: s.trace_id.hex() == missing_trace, "for the failed call")
    assert failed.name == f"{RUNTIME}/PodSandboxStatus"
    assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR and failed.status.message == "NOT_FOUND"
    assert attributes(failed)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]

    # The client decided not to sample: nothing is exported for that trace.
    collector.until(lambda s: s.name == f"{RUNTIME}/StartContainer", "for StartContainer")
    time.sleep(0.5)
    assert not collector.find(lambda s: s.trace_id.hex() == unsampled_trace)
    with collector._lock:
        resources = {r.get("service.name") for r, _ in collector.spans}
    assert resources == {"shimd"} and collector.paths == {"/v1/traces"}


def test_a_collector_that_is_down_costs_no_call(shimd_factory: Callable[..., ShimdProcess],
                                                 busybox_registry: tuple[str, str], cni_loopback_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Spans go out from the exporter's thread: calls answer while nothing listens at the endpoint, the
    failed exports are reported in shimd's own JSON log lines, and the daemon stops in time with spans it
    could not deliver."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with started_runtime(shimd_factory, busybox_registry, cni_loopback_dir,
                             f'[tracing]\nendpoint = "http://127.0.0.1:{port}"\n') as rt:
            pod_id, cfg = rt.run_pod("nocollector")
            cid = rt.create(pod_id, cfg, "c", ["sleep", "3600"])
            rt.start(cid)
            assert rt.status(cid).state == rt.pb.ContainerState.CONTAINER_RUNNING
            rt.client.runtime.StopPodSandbox(rt.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            rt.client.runtime.RemovePodSandbox(rt.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
            proc = rt.proc.proc
            assert proc is not None
            rt.proc.stop()  # SIGTERM, then SIGKILL after 5 s
            assert proc.returncode == 0, rt.proc.log_tail()
    lines = rt.proc.log_path.read_text().splitlines()
    assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")][:5]
    reports = [json.loads(line) for line in lines if '"opentelemetry: ' in line]
    assert reports and all(r["endpoint"] == f"http://127.0.0.1:{port}" for r in reports), reports
