"""Traces of CRI calls exported over OTLP/HTTP ([tracing] endpoint; off when it is empty).

As containerd does for its CRI service: each call is a server span named after its gRPC method, the
child of the span the client sent in the W3C `traceparent`/`tracestate` request headers (kubelet does,
with its tracing on), sampled by the parent's decision or else by `sampling_ratio`. A pod or container
lifecycle call (shimd/phases.py) also gets one child span per phase, at the times the phase ran; a
step that ran alongside the main line has the attribute `shimd.overlapped`.

Spans are made once a call has ended, from the times it already took, and the SDK's batch processor
exports them from a thread of its own: the event loop never waits for the collector, and a collector
that is down loses spans, never calls. OpenTelemetry is imported only when an endpoint is configured.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from grpclib.const import Status

from shimd import log, phases
from shimd.config import TracingConfig

EXPORT_TIMEOUT = 5.0  # seconds, one export request
SHUTDOWN_WAIT = 5.0  # seconds the daemon's stop waits for the last spans to be exported

_log = log.get("tracing")
_SDK_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})


class _SdkLog(logging.Handler):
    """The SDK reports failed exports through the logging module: as shimd's JSON lines, like all others."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(logging.WARNING)
        self._log = log.get("tracing", endpoint=endpoint)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            getattr(self._log, level if level in _SDK_LEVELS else "warning")(
                f"opentelemetry: {record.getMessage()}", sdk_logger=record.name)
        except Exception:
            self.handleError(record)


class Tracing:
    """The tracer provider and what turns an ended call into spans."""

    def __init__(self, cfg: TracingConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name}),
                                        sampler=ParentBased(TraceIdRatioBased(cfg.sampling_ratio)))
        exporter = OTLPSpanExporter(endpoint=cfg.endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT * 1000))
        self._tracer = self._provider.get_tracer("shimd.cri")
        self._propagator = TraceContextTextMapPropagator()
        self._server, self._error, self._within = SpanKind.SERVER, StatusCode.ERROR, set_span_in_context
        self.endpoint = cfg.endpoint
        sdk_log = logging.getLogger("opentelemetry")
        sdk_log.handlers = [_SdkLog(cfg.endpoint)]
        sdk_log.propagate = False  # else Python's last-resort handler prints them as plain text too

    def call_ended(self, method: str, status: str, started_ns: int, ended_ns: int,
                   headers: Mapping[str, str] | None, timed: phases.Phases | None) -> None:
        """One CRI call ended: method is its gRPC path without the leading slash, status its status's name."""
        parent = self._propagator.extract(headers) if headers else None
        service, _, name = method.rpartition("/")
        code = Status[status].value if status in Status.__members__ else Status.UNKNOWN.value
        attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                                      "rpc.grpc.status_code": code}
        if timed is not None:
            attributes.update({f"shimd.{k}": v for k, v in timed.context.items()})
        span = self._tracer.start_span(method, context=parent, kind=self._server, attributes=attributes,
                                       start_time=started_ns)
        if status != "OK":
            span.set_status(self._error, status)
        if timed is not None and timed.intervals and span.is_recording():
            self._phase_spans(span, timed, started_ns)
        span.end(end_time=ended_ns)

    def _phase_spans(self, call_span: Any, timed: phases.Phases, started_ns: int) -> None:
        within = self._within(call_span)
        for name, began, ended, overlapped in timed.intervals or ():
            attributes = {"shimd.overlapped": True} if overlapped else None
            child = self._tracer.start_span(name, context=within, attributes=attributes,
                                            start_time=started_ns + int((began - timed.started) * 1e9))
            child.end(end_time=started_ns + int((ended - timed.started) * 1e9))

    async def close(self) -> None:
        """Exports what is still queued and stops the exporter, waiting at most SHUTDOWN_WAIT.

        The SDK's shutdown exports the queue batch by batch, each up to EXPORT_TIMEOUT: against a
        collector that never answers that is far longer than a daemon should take to stop. It runs in a
        daemon thread, left behind (and ended with the process) when the wait is over.
        """
        done = threading.Thread(target=self._provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        await asyncio.to_thread(done.join, SHUTDOWN_WAIT)
        if done.is_alive():
            _log.warning("tracing: spans still queued at shutdown were dropped", endpoint=self.endpoint)


def configure(cfg: TracingConfig) -> Tracing | None:
    """The daemon's tracing, or None when no endpoint is configured."""
    if not cfg.endpoint:
        return None
    tracing = Tracing(cfg)
    phases.record_intervals()
    _log.info("tracing CRI calls", endpoint=cfg.endpoint, sampling_ratio=cfg.sampling_ratio)
    return tracing
