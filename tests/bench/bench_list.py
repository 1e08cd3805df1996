"""List calls with many containers: shimd vs a private containerd 1.6, both up at once, batches interleaved.

bench_pod_start times ListContainers for one runtime, then (minutes later) for the other; on a
2-core VM the machine's speed drifts by tens of percent between those phases, which is larger
than the difference being measured. Here both daemons hold the same workload at the same time
(pods with --per-pod containers each, created and not started: only the shims run), and the timed
calls alternate between them in batches (which one goes first swaps every round), so drift hits
both alike. The workload grows through the sizes of --pods (20 pods, then 480 more for 500, ...),
and each size is measured in turn:

  * latency p50 / p95 per method and runtime over all timed calls, and the shimd/containerd ratio
    of each round's p50s (median and range over the rounds);
  * the daemon's own CPU per call over the whole run (utime + stime of the daemon process;
    containerd's shims and shimd's shims are idle here);
  * each daemon's CPU while idle (--idle seconds before the timed rounds): what one could take from
    the other's batches.

Same grpcio client, same busybox image from a local registry, same bridge conflist, same runc.

    .venv/bin/python -m tests.bench.bench_list [--pods 20,500] [--per-pod 1] [--rounds 20] [--batch 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tests.bench.bench_pod_start import (
    SETUP_WORKERS,
    Bench,
    Containerd,
    Runtime,
    Shimd,
    bench_workspace,
    cni_conf,
    pct,
    ratio,
)

METHODS = ("ListContainers", "ListPodSandbox")
REPLY_ITEMS = {"ListContainers": "containers", "ListPodSandbox": "items"}


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class Timings:
    latencies: list[float] = field(default_factory=list)  # seconds, every timed call
    round_p50: list[float] = field(default_factory=list)  # seconds, one per round
    cpu_per_call: list[float] = field(default_factory=list)  # seconds, one per round
    items: int = 0


@dataclass
class Live:
    runtime: Runtime
    bench: Bench

    def call(self, method: str) -> Callable[[], Any]:
        c = self.bench.c
        fn = getattr(c.runtime, method)
        req = getattr(c.pb, f"{method}Request")()
        return lambda: fn(req, timeout=60)


def time_round(live: Live, method: str, batch: int, t: Timings) -> None:
    call = live.call(method)
    call()  # one untimed call: the other runtime's batch ran in between
    lat = []
    cpu0 = process_cpu_s(live.runtime.pid)
    for _ in range(batch):
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    t.cpu_per_call.append((process_cpu_s(live.runtime.pid) - cpu0) / batch)
    t.latencies.extend(lat)
    t.round_p50.append(statistics.median(lat))


def report(pods: int, results: dict[str, dict[str, Timings]], idle: dict[str, float],
           args: argparse.Namespace) -> None:
    print(f"\n{pods} pods, {pods * args.per_pod} containers; {args.rounds} rounds of {args.batch} calls "
          "per runtime, interleaved (times in ms; ratio = shimd / containerd)")
    if idle:
        print("idle daemon CPU: " + ", ".join(f"{n} {v * 1000:.1f} ms/s" for n, v in idle.items()))
    print(f"{'method':<16}{'':<12}{'items':>6}{'p50':>8}{'p95':>8}{'CPU/call':>10}")
    for method in args.methods:
        for name in ("shimd", "containerd"):
            t = results[name][method]
            print(f"{method:<16}{name:<12}{t.items:>6}{pct(t.latencies, .5) * 1000:>8.2f}"
                  f"{pct(t.latencies, .95) * 1000:>8.2f}{statistics.mean(t.cpu_per_call) * 1000:>10.2f}")
        ours, theirs = results["shimd"][method], results["containerd"][method]
        per_round = [a / b for a, b in zip(ours.round_p50, theirs.round_p50, strict=True)]
        # CPU is read in clock ticks (10 ms), so one batch's figure is coarse: the mean over all rounds is
        # the whole run's CPU over its calls. A run too short to show a tick makes ratio() print "-".
        cpu = ratio(statistics.mean(ours.cpu_per_call), statistics.mean(theirs.cpu_per_call))
        print(f"{method:<16}{'ratio':<12}{'':>6}{ratio(pct(ours.latencies, .5), pct(theirs.latencies, .5)):>8}"
              f"{ratio(pct(ours.latencies, .95), pct(theirs.latencies, .95)):>8}{cpu:>10}"
              f"   per-round p50 ratio: median {statistics.median(per_round):.2f}, "
              f"range {min(per_round):.2f}-{max(per_round):.2f}")
    print(flush=True)


def grow(b: Bench, have: int, want: int, per_pod: int) -> None:
    """Pods have..want-1, each with per_pod sleeping containers, created and not started."""
    def one(i: int) -> None:
        pod_id, cfg = b.run_pod(f"list-{i}")
        for j in range(per_pod):
            b.create(pod_id, cfg, f"c{j}", ["sleep", "3600"])

    with ThreadPoolExecutor(SETUP_WORKERS) as pool:
        list(pool.map(one, range(have, want)))


def measure(live: dict[str, Live], args: argparse.Namespace) -> tuple[dict[str, dict[str, Timings]], dict[str, float]]:
    results: dict[str, dict[str, Timings]] = {n: {m: Timings() for m in args.methods} for n in live}
    for name, lv in live.items():
        for method in args.methods:
            call = lv.call(method)
            for _ in range(args.warmup):
                call()
            reply = call()
            results[name][method].items = len(getattr(reply, REPLY_ITEMS[method]))
    idle: dict[str, float] = {}
    if args.idle > 0:
        cpu0 = {n: process_cpu_s(lv.runtime.pid) for n, lv in live.items()}
        time.sleep(args.idle)
        idle = {n: (process_cpu_s(lv.runtime.pid) - cpu0[n]) / args.idle for n, lv in live.items()}
    order = list(live.items())
    for _ in range(args.rounds):
        for method in args.methods:
            for name, lv in order:
                time_round(lv, method, args.batch, results[name][method])
        order.reverse()  # neither runtime always runs right after the other's batch
    return results, idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", default="20,500", help="pod counts measured in turn (the workload grows)")
    ap.add_argument("--per-pod", type=int, default=1, help="containers per pod")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100, help="timed calls per runtime and round")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls per runtime first")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured first (0: skip)")
    ap.add_argument("--json", default="", help="also write raw results here")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    if unknown := set(args.methods) - set(REPLY_ITEMS):
        ap.error(f"--methods: not a list call: {', '.join(sorted(unknown))}")
    sizes = [int(n) for n in args.pods.split(",") if n]
    if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
        ap.error("--pods: increasing pod counts, e.g. 20,500")

    with bench_workspace("bench-list-") as ws, contextlib.ExitStack() as stack:
        conf = cni_conf("bridge", ws.net)
        makers: dict[str, Callable[[Any], Runtime]] = {
            "shimd": lambda d: Shimd(ws.work / "shimd", ws.reg, d),
            "containerd": lambda d: Containerd(ws.work / "containerd", ws.reg, d, ws.pause),
        }
        live: dict[str, Live] = {}
        for name, make in makers.items():
            (ws.work / name).mkdir()
            conf_dir = ws.work / f"net.d-{name}"
            conf_dir.mkdir()
            (conf_dir / "10-bench.conflist").write_text(json.dumps(conf))
            rt = make(conf_dir)
            client = rt.start()
            stack.callback(rt.stop)
            b = Bench(client, ws.image, ws.work / f"logs-{name}", host_network=False)
            # Registered after rt.stop, so it runs first: pods go before their daemon does.
            stack.callback(lambda b=b: b.remove_all())
            b.pull(ws.image)
            if name == "containerd":
                b.pull(ws.pause)
            live[name] = Live(rt, b)

        everything: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
        have = 0
        for pods in sizes:
            for name, lv in live.items():
                print(f"{name}: {have} -> {pods} pods ...", flush=True)
                grow(lv.bench, have, pods, args.per_pod)
            have = pods
            results, idle = measure(live, args)
            report(pods, results, idle, args)
            everything[pods] = {n: {m: t.__dict__ for m, t in r.items()} for n, r in results.items()}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
