"""Soak: create / exec / remove cycles for a while; shimd's RSS and open fds must stay flat.

Each cycle: RunPodSandbox, CreateContainer + StartContainer (sleep), ExecSync twice, a short-lived
second container run to completion, StopPodSandbox, RemovePodSandbox. A few long-lived pods stay up
the whole time (as on a real node). Every --sample seconds the daemon's RSS and fd count are
recorded; at the end the growth between the first and last quarter of the run is reported (the
first minute is warm-up: caches, allocator arenas). Optionally the same against containerd 1.6.

    .venv/bin/python -m tests.bench.bench_soak [--minutes 10] [--with-containerd [--concurrent]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.bench.bench_pod_start import (
    Bench,
    Containerd,
    Runtime,
    Shimd,
    bench_workspace,
    cni_conf,
    status_kb,
)

LONG_LIVED = 5


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak(rt: Runtime, image: str, pause: str, args: argparse.Namespace, work: Path) -> dict[str, object]:
    client = rt.start()
    pb = client.pb
    b = Bench(client, image, work / f"logs-{rt.name}", False)
    samples: list[tuple[float, int, int]] = []
    cycles = 0
    errors = 0
    try:
        b.pull(image)
        if isinstance(rt, Containerd):
            b.pull(pause)
        for i in range(LONG_LIVED):
            b.one_pod(f"resident-{i}")
        t_start = time.monotonic()
        next_sample = t_start
        while time.monotonic() - t_start < args.minutes * 60:
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - t_start, status_kb(rt.pid), fds(rt.pid)))
                next_sample += args.sample
            name = f"cycle-{cycles}"
            try:
                pod_id, cfg = b.run_pod(name)
                cid = b.create(pod_id, cfg, "main", ["sleep", "3600"])
                b.start(cid)
                for _ in range(2):
                    r = client.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "hi"], timeout=10),
                                                timeout=30)
                    assert r.exit_code == 0 and r.stdout == b"hi\n", r
                short = b.create(pod_id, cfg, "short", ["sh", "-c", "exit 0"])
                b.start(short)
                deadline = time.monotonic() + 20
                while client.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=short),
                                                     timeout=30).status.state != pb.CONTAINER_EXITED:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{short} did not exit")
                    time.sleep(0.05)
                client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
                client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
            except Exception as e:  # counted and shown: a soak reports failures rather than stopping at one
                errors += 1
                print(f"[{rt.name}] cycle {cycles}: {e!r}"[:300], flush=True)
            cycles += 1
        samples.append((time.monotonic() - t_start, status_kb(rt.pid), fds(rt.pid)))
    finally:
        try:
            b.remove_all()
        finally:
            rt.stop()
    q = max(1, len(samples) // 4)
    warm = [s for s in samples if s[0] >= 60] or samples
    first, last = warm[:q], warm[-q:]
    return {
        "minutes": args.minutes, "cycles": cycles, "errors": errors,
        "cycles_per_min": cycles / args.minutes,
        "rss_first_kb": statistics.median(s[1] for s in first), "rss_last_kb": statistics.median(s[1] for s in last),
        "rss_max_kb": max(s[1] for s in samples),
        "fds_first": statistics.median(s[2] for s in first), "fds_last": statistics.median(s[2] for s in last),
        "fds_max": max(s[2] for s in samples),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between RSS/fd samples")
    ap.add_argument("--with-containerd", action="store_true", help="then the same soak against containerd 1.6")
    ap.add_argument("--concurrent", action="store_true",
                    help="with --with-containerd: soak both at once (same load on both; halves the wall time)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    results: dict[str, dict[str, object]] = {}
    with bench_workspace("bench-soak-") as ws:
        work, net, reg, image, pause = ws.work, ws.net, ws.reg, ws.image, ws.pause
        conf = cni_conf("bridge", net)
        runtimes: dict[str, Runtime] = {}
        for name in ("shimd", "containerd") if args.with_containerd else ("shimd",):
            (work / name).mkdir()
            conf_dir = work / f"net.d-{name}"
            conf_dir.mkdir()
            (conf_dir / "10-bench.conflist").write_text(json.dumps(conf))
            runtimes[name] = (Shimd(work / name, reg, conf_dir) if name == "shimd"
                              else Containerd(work / name, reg, conf_dir, pause))
        if args.concurrent:
            print(f"soaking {', '.join(runtimes)} at once for {args.minutes:g} min ...", flush=True)
            with ThreadPoolExecutor(len(runtimes)) as pool:
                futures = {name: pool.submit(soak, rt, image, pause, args, work) for name, rt in runtimes.items()}
                results = {name: f.result() for name, f in futures.items()}
        else:
            for name, rt in runtimes.items():
                print(f"soaking {name} for {args.minutes:g} min ...", flush=True)
                results[name] = soak(rt, image, pause, args, work)
    for name, r in results.items():
        print(f"\n== {name}: {r['cycles']} cycles in {r['minutes']:g} min ({r['cycles_per_min']:.1f}/min), "
              f"{r['errors']} errors")
        print(f"  RSS  {r['rss_first_kb'] / 1024:.1f} -> {r['rss_last_kb'] / 1024:.1f} MiB "  # type: ignore[operator]
              f"(max {r['rss_max_kb'] / 1024:.1f})")  # type: ignore[operator]
        print(f"  fds  {r['fds_first']} -> {r['fds_last']} (max {r['fds_max']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
