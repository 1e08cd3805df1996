"""The metric set. Counters are fed by hooks; object gauges are computed from the store at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# RPC latency buckets: CRI calls range from sub-millisecond lists to minute-long pulls.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PULL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Phases of a pod start or teardown: from a record write (tens of microseconds) to a slow CNI plugin.
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                 30)


class _Objects(Collector):
    """Pods and containers per state and handler, read from the store when scraped."""

    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pods = GaugeMetricFamily("shimd_pods", "Pod sandboxes known to shimd, by state (INITIALIZING, READY, "
                                 "NOTREADY, STOPPED: shimd/store/lifecycle.py).", labels=["state", "handler"])
        ctrs = GaugeMetricFamily("shimd_containers", "Containers known to shimd.", labels=["state", "handler"])
        store = self._store_of()
        if store is not None:
            pod_counts = Counter((p.state, p.handler) for p in list(store.pods.values()))
            ctr_counts: Counter[tuple[str, str]] = Counter()
            for c in list(store.containers.values()):
                pod = store.pods.get(c.pod_id)
                ctr_counts[(c.state, pod.handler if pod else "")] += 1
            for (state, handler), n in sorted(pod_counts.items()):
                pods.add_metric([state, handler], n)
            for (state, handler), n in sorted(ctr_counts.items()):
                ctrs.add_metric([state, handler], n)
        yield pods
        yield ctrs


class Metrics:
    def __init__(self, store_of: Any) -> None:
        """store_of: a callable returning the daemon's Store (or None before it is loaded)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._phase_children: dict[tuple[str, str], Any] = {}
        self.rpc_total = PromCounter("shimd_cri_requests", "CRI requests served, by method and gRPC status.",
                                     ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("shimd_cri_request_duration_seconds", "CRI request latency, by method.",
                                     ["method"], buckets=RPC_BUCKETS, registry=r)
        self.pull_bytes = PromCounter("shimd_image_pull_bytes", "Bytes of images pulled (compressed layers and "
                                      "config).", registry=r)
        self.pull_seconds = Histogram("shimd_image_pull_duration_seconds", "Duration of successful image pulls.",
                                      buckets=PULL_BUCKETS, registry=r)
        self.pull_failures = PromCounter("shimd_image_pull_failures", "Image pulls that failed.", registry=r)
        self.shim_deaths = PromCounter("shimd_shim_deaths", "Shims found dead (their pods' tasks are lost).",
                                       ["handler"], registry=r)
        self.shim_restarts = PromCounter("shimd_shim_reconnects", "Reconnections to a shim after losing it "
                                         "(daemon restarts included).", ["handler"], registry=r)
        self.phase_seconds = Histogram("shimd_phase_duration_seconds", "Time spent in each phase of the pod and "
                                       "container lifecycle calls that succeeded (shimd/phases.py), by call and "
                                       "phase.", ["rpc", "phase"], buckets=PHASE_BUCKETS, registry=r)
        r.register(_Objects(store_of))

    # --- hooks -------------------------------------------------------------------------------
    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Matches shimd.cri.dispatch.add_observer's signature."""
        children = self._rpc_children.get((method, code))
        if children is None:
            # labels() locks and validates on every call; kubelet's steady traffic is a handful of pairs.
            children = self._rpc_children[(method, code)] = (self.rpc_total.labels(method, code),
                                                             self.rpc_seconds.labels(method))
        children[0].inc()
        children[1].observe(seconds)
        if method == "PullImage" and code != "OK":
            self.pull_failures.inc()

    def observe_phases(self, rpc: str, steps: dict[str, float]) -> None:
        """Matches shimd.phases.add_observer's signature."""
        for phase, seconds in steps.items():
            child = self._phase_children.get((rpc, phase))
            if child is None:
                child = self._phase_children[(rpc, phase)] = self.phase_seconds.labels(rpc, phase)
            child.observe(seconds)

    def record_pull(self, size_bytes: int, seconds: float) -> None:
        self.pull_bytes.inc(max(0, size_bytes))
        self.pull_seconds.observe(seconds)

    def record_shim_death(self, handler: str) -> None:
        self.shim_deaths.labels(handler).inc()

    def record_shim_reconnect(self, handler: str) -> None:
        self.shim_restarts.labels(handler).inc()
