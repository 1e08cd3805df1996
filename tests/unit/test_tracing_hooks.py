"""shimd/tracing.py and its hooks: off unless configured (OpenTelemetry not even imported), and the trace
context read from both request paths (grpclib's stream and the unary fast path)."""

from __future__ import annotations

import subprocess
import sys

from multidict import MultiDict

from shimd import config, tracing
from shimd.cri import dispatch
from shimd.cri.unary import UnaryStream


def test_off_by_default_and_opentelemetry_not_imported() -> None:
    assert tracing.configure(config.TracingConfig()) is None
    code = ("import sys, shimd.daemon, shimd.cri.dispatch as d; "
            "assert d._tracer is None; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


class _GrpclibLike:
    def __init__(self, metadata: MultiDict[str]) -> None:
        self.metadata = metadata


def test_trace_headers_from_either_path() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    stream = _GrpclibLike(MultiDict([("traceparent", tp), ("user-agent", "kubelet"), ("tracestate", "a=1")]))
    assert dispatch._trace_headers(stream) == {"traceparent": tp, "tracestate": "a=1"}
    assert dispatch._trace_headers(_GrpclibLike(MultiDict())) is None
    fast = UnaryStream(b"", object, object, None, {"traceparent": tp})  # type: ignore[arg-type]
    assert dispatch._trace_headers(fast) == {"traceparent": tp}
    assert dispatch._trace_headers(UnaryStream(b"", object, object, None)) is None  # type: ignore[arg-type]
