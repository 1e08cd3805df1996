"""An OTLP/HTTP trace endpoint for tests: receives the protobuf exports on 127.0.0.1 and decodes them with
OpenTelemetry's own protobuf definitions (opentelemetry-proto), independent of the SDK that sent them."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class Collector:
    """Receives OTLP/HTTP protobuf exports on 127.0.0.1 and keeps every span with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self.paths: set[str] = set()
        self._lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with collector._lock:
                    collector.paths.add(self.path)
                    for rs in req.resource_spans:
                        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            collector.spans.extend((resource, span) for span in ss.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def find(self, match: Callable[[Any], bool]) -> list[Any]:
        with self._lock:
            return [span for _, span in self.spans if match(span)]

    def until(self, match: Callable[[Any], bool], what: str, timeout: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(match)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no span {what} reached the collector")
            time.sleep(0.05)


def attributes(span: Any) -> dict[str, Any]:
    """A decoded span's attributes as plain values."""
    out: dict[str, Any] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind) if kind else None
    return out
