"""Scale: up to 500 pods (one sleeping container each) on one node, shimd vs containerd 1.6, one at a time.

At each level of existing pods (default 0, 250, 500): daemon RSS, the shims' summed RSS and PSS,
per-pod memory (drop of MemAvailable per pod, everything included), ListPodSandbox / ListContainers
/ Status p50, and pod start p50 (RunPodSandbox + CreateContainer + StartContainer, sequential probes).
The cost of a call must grow flat or logarithmically with the pod count, not linearly.

Memory is watched before every batch: below --min-free-gib of MemAvailable the run stops early and
says so. Everything (pods, daemons, registry, bridge) is removed at the end, also on failure.

    .venv/bin/python -m tests.bench.bench_scale [--levels 0,250,500] [--network bridge|host] [--only shimd]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.bench_pod_start import (
    Bench,
    Containerd,
    Runtime,
    Shimd,
    bench_workspace,
    cni_conf,
    status_kb,
)

FILL_WORKERS = 8


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def _comm(pid: str) -> bytes:
    with open(f"/proc/{pid}/comm", "rb") as f:
        return f.read().strip()


def shim_memory_kb(base: Path) -> tuple[int, int, int]:
    """(count, summed RSS, summed PSS) of the shims whose -address lies under base (either runtime), and
    of shimd's shims forked by its zygote (named shim-<pod>, with the zygote's command line)."""
    count = rss = pss = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"-address" in argv and b"start" not in argv and b"delete" not in argv:
                addr = argv[argv.index(b"-address") + 1]
            elif b"shims.runc.zygote" in argv and _comm(pid).startswith(b"shim-"):
                addr = argv[-2] if argv[-1] == b"" else argv[-1]  # a forked shim: the zygote's command line
            else:
                continue
            if not addr.startswith(str(base).encode()):
                continue
            count += 1
            rss += status_kb(int(pid))
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except (OSError, IndexError):
            continue
    return count, rss, pss


def p50_ms(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@dataclass
class Level:
    pods: int
    daemon_rss_kb: int = 0
    shims: int = 0
    shims_rss_kb: int = 0
    shims_pss_kb: int = 0
    mem_used_kb: int = 0  # MemAvailable drop since the empty daemon
    list_pods_ms: float = 0.0
    list_containers_ms: float = 0.0
    status_ms: float = 0.0
    start_p50_ms: float = 0.0
    run_pod_p50_ms: float = 0.0


@dataclass
class Result:
    levels: list[Level] = field(default_factory=list)
    stopped_early: str = ""
    fill_seconds: float = 0.0
    teardown_seconds: float = 0.0


def scale(rt: Runtime, base: Path, image: str, pause: str, args: argparse.Namespace, work: Path) -> Result:
    res = Result()
    client = rt.start()
    b = Bench(client, image, work / f"logs-{rt.name}", args.network == "host")
    pb = client.pb
    try:
        b.pull(image)
        if isinstance(rt, Containerd):
            b.pull(pause)
        b.one_pod("warmup")
        b.remove_all()
        time.sleep(args.settle)
        mem0 = mem_available_kb()
        count = 0
        made = 0
        for target in args.levels:
            # Fill up to the level, watching memory between batches.
            t0 = time.perf_counter()
            while count < target:
                if mem_available_kb() < args.min_free_gib * (1 << 20):
                    res.stopped_early = f"MemAvailable below {args.min_free_gib} GiB at {count} pods"
                    break
                n = min(FILL_WORKERS * 4, target - count)
                with ThreadPoolExecutor(FILL_WORKERS) as pool:
                    list(pool.map(lambda i: b.one_pod(f"fill-{i}"), range(made, made + n)))
                made += n
                count += n
            res.fill_seconds += time.perf_counter() - t0
            if res.stopped_early:
                break
            time.sleep(args.settle)
            lv = Level(pods=count)
            lv.daemon_rss_kb = status_kb(rt.pid)
            lv.shims, lv.shims_rss_kb, lv.shims_pss_kb = shim_memory_kb(base)
            lv.mem_used_kb = mem0 - mem_available_kb()
            lv.list_pods_ms = p50_ms(lambda: client.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60),
                                     args.runs)
            lv.list_containers_ms = p50_ms(
                lambda: client.runtime.ListContainers(pb.ListContainersRequest(), timeout=60), args.runs)
            lv.status_ms = p50_ms(lambda: client.runtime.Status(pb.StatusRequest(), timeout=60), args.runs)
            starts, runs = [], []
            for i in range(args.probes):
                one = b.one_pod(f"probe-{target}-{i}")
                starts.append(one["end-to-end"])
                runs.append(one["RunPodSandbox"])
            count += args.probes
            lv.start_p50_ms = statistics.median(starts) * 1000
            lv.run_pod_p50_ms = statistics.median(runs) * 1000
            res.levels.append(lv)
            print(f"[{rt.name}] {lv}", flush=True)
    finally:
        t0 = time.perf_counter()
        try:
            b.remove_all()
        finally:
            res.teardown_seconds = time.perf_counter() - t0
            rt.stop()
    return res


def report(results: dict[str, Result]) -> None:
    for name, res in results.items():
        print(f"\n== {name}" + (f" (stopped early: {res.stopped_early})" if res.stopped_early else ""))
        print(f"{'pods':>5} {'daemon RSS':>10} {'shims':>5} {'shim RSS/pod':>12} {'shim PSS/pod':>12} "
              f"{'mem/pod':>8} {'ListPods':>9} {'ListCtrs':>9} {'Status':>7} {'start p50':>9} {'RunPod p50':>10}")
        for lv in res.levels:
            per = max(lv.pods, 1)
            shims = max(lv.shims, 1)
            print(f"{lv.pods:>5} {lv.daemon_rss_kb / 1024:>8.1f}Mi {lv.shims:>5} "
                  f"{lv.shims_rss_kb / shims / 1024:>10.1f}Mi {lv.shims_pss_kb / shims / 1024:>10.1f}Mi "
                  f"{(lv.mem_used_kb / per / 1024) if lv.pods else 0:>6.1f}Mi {lv.list_pods_ms:>7.2f}ms "
                  f"{lv.list_containers_ms:>7.2f}ms {lv.status_ms:>5.2f}ms {lv.start_p50_ms:>7.0f}ms "
                  f"{lv.run_pod_p50_ms:>8.0f}ms")
        print(f"fill {res.fill_seconds:.0f}s, teardown {res.teardown_seconds:.0f}s")
    if len(results) == 2 and all(r.levels for r in results.values()):
        a, c = results["shimd"].levels, results["containerd"].levels
        print("\nshimd / containerd at matching levels:")
        for x, y in zip(a, c, strict=False):
            def r(u: float, v: float) -> str:
                return f"{u / v:.2f}" if v else "-"
            print(f"  {x.pods:>4} pods: daemon RSS {r(x.daemon_rss_kb, y.daemon_rss_kb)}, "
                  f"mem/pod {r(x.mem_used_kb, y.mem_used_kb)}, "
                  f"ListContainers {r(x.list_containers_ms, y.list_containers_ms)}, "
                  f"Status {r(x.status_ms, y.status_ms)}, start {r(x.start_p50_ms, y.start_p50_ms)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="0,250,500", help="existing-pod counts to measure at")
    ap.add_argument("--network", choices=("bridge", "host"), default="bridge",
                    help="a private NAT'ed bridge (a netns and veth per pod), or host-network pods")
    ap.add_argument("--probes", type=int, default=10, help="pods started one by one at each level (start p50)")
    ap.add_argument("--runs", type=int, default=20, help="calls per List/Status p50")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--min-free-gib", type=float, default=4.0, help="stop filling below this MemAvailable")
    ap.add_argument("--only", choices=("shimd", "containerd"), default="")
    ap.add_argument("--json", default="", help="also write raw results here")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]

    results: dict[str, Result] = {}
    with bench_workspace("bench-scale-") as ws:
        work, net, reg, image, pause = ws.work, ws.net, ws.reg, ws.image, ws.pause
        conf = cni_conf(args.network, net)  # the bridge's /22 has room for 1000 pods
        for name in ("shimd", "containerd"):
            if args.only and name != args.only:
                continue
            (work / name).mkdir()
            conf_dir = work / f"net.d-{name}"
            conf_dir.mkdir()
            (conf_dir / "10-bench.conflist").write_text(json.dumps(conf))
            rt: Runtime = (Shimd(work / name, reg, conf_dir) if name == "shimd"
                           else Containerd(work / name, reg, conf_dir, pause))
            print(f"measuring {name} ...", flush=True)
            results[name] = scale(rt, work / name, image, pause, args, work)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({k: {"levels": [vars(lv) for lv in v.levels],
                                                   "stopped_early": v.stopped_early} for k, v in results.items()},
                                              indent=1))


if __name__ == "__main__":
    main()
