"""Sandboxed handlers: pod start latency and per-pod memory, shimd vs a private containerd 1.6.

Two comparisons, each on the same busybox image, registry and private NAT'ed CNI bridge (containerd
1.6 needs an eth0 address), one daemon at a time:

  runsc   shimd's runsc handler (the runc shim driving runsc; one gVisor sandbox per pod) vs
          containerd's containerd-shim-runc-v2 with Options.BinaryName = runsc. containerd cannot pass
          runsc global flags, so BinaryName is a wrapper adding shimd's default handler flags
          (--network=host --platform=ptrace --overlay2=root:memory; runsc's own netstack fails here).
          That setup creates sandboxes but cannot run a container in them (StartContainer hangs: `runsc
          start` hands the shim's output-capture pipe to the container, so the shim waits for an EOF
          that never comes) nor stop them (the pid the shim watches is the sandbox's, which outlives the
          container). So runsc is compared on sandboxes alone (RunPodSandbox; containerd's are left
          running and force-deleted at the end); shimd's full pods are reported on their own.
  shimv2  shimd's shim v2 driver running containerd-shim-runc-v2 (logs through shimd's binary://
          CRI logger) vs containerd's own use of containerd-shim-runc-v2 (logs through containerd).

For each: N pods one after another (full: RunPodSandbox + CreateContainer + StartContainer of a
sleeping busybox; sandbox: RunPodSandbox alone): p50/p95 end to end; then M pods held at once:
per-pod memory = the PSS of each pod's shim process tree (shim, sandbox, gofer, loggers, containers)
+ the daemon's RSS growth divided by M.

    .venv/bin/python -m tests.bench.bench_sandboxed --pods 20 --mem-pods 5 [--only runsc|shimv2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shimd.config import HandlerConfig
from shimd.network import namespaces
from shimd.runtimes.runsc import global_flags
from tests.bench.bench_pod_start import (
    Bench,
    bench_workspace,
    cni_conf,
    pct,
    shim_pids,
    status_kb,
)
from tests.bench.containerd_peer import ContainerdPeer
from tests.support.cri_client import CriClient
from tests.support.daemon import ShimdProcess
from tests.support.registry import Registry
from tests.support.runtime import kill_strays

SETTLE = 2.0
# containerd-shim-runc-v2's default runc root for the k8s.io namespace (the peer config sets none).
CONTAINERD_RUNC_ROOT = "/run/containerd/runc/k8s.io"


@dataclass
class Result:
    start_s: list[float] = field(default_factory=list)
    calls: dict[str, list[float]] = field(default_factory=dict)
    per_pod_tree_kb: list[int] = field(default_factory=list)
    daemon_delta_kb: int = 0
    pods_held: int = 0
    error: str = ""

    @property
    def per_pod_kb(self) -> float:
        if not self.per_pod_tree_kb or not self.pods_held:
            return 0.0
        return statistics.mean(self.per_pod_tree_kb) + self.daemon_delta_kb / self.pods_held


class HandlerBench(Bench):
    """bench_pod_start's CRI helper, with a runtime handler on every pod."""

    def __init__(self, client: CriClient, image: str, log_dir: Path, handler: str) -> None:
        super().__init__(client, image, log_dir, host_network=False)
        self.handler = handler

    def run_pod(self, name: str) -> tuple[str, Any]:
        cfg = self.pod_config(name)
        resp = self.c.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=cfg, runtime_handler=self.handler),
                                            timeout=120)
        return resp.pod_sandbox_id, cfg


# --- memory of a pod ------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(pid))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _shim_of(pod_id: str) -> int:
    """The long-lived shim serving the pod (zygote-forked or started with `-id <pod id>`), or 0."""
    pids = shim_pids(pod_id)
    return pids[0] if pids else 0


def tree_pss_kb(root: int) -> int:
    kids, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo += kids.get(pid, [])
    return total


# --- daemons ---------------------------------------------------------------------------------------------


def runsc_wrapper(path: Path) -> Path:
    """runsc with the global flags containerd's runc shim cannot pass: the same as shimd's default handler."""
    runsc = shutil.which("runsc") or "/usr/bin/runsc"
    flags = " ".join(global_flags(HandlerConfig(name="runsc", driver="runsc", binary=runsc)))
    path.write_text(f'#!/bin/sh\nexec {runsc} {flags} "$@"\n')
    path.chmod(0o755)
    return path


def shimd_proc(base: Path, reg: Registry, conf_dir: Path) -> ShimdProcess:
    proc = ShimdProcess(base, f'[registries.hosts."{reg.host}"]\ninsecure = true\n'
                              f'[cni]\nconf_dir = "{conf_dir}"\n'
                              '[handlers.runcv2]\ndriver = "shimv2"\nbinary = "containerd-shim-runc-v2"\n'
                              'runtime_type = "io.containerd.runc.v2"\n'
                              '[streaming]\naddress = "127.0.0.1:0"\n')
    text = proc.config_path.read_text().replace('log_level = "debug"', 'log_level = "info"')
    proc.config_path.write_text(text)
    return proc


def _sandbox_only(b: HandlerBench, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    b.run_pod(name)
    return {"RunPodSandbox": time.perf_counter() - t0}


def _memory(b: HandlerBench, daemon_pid: int, args: argparse.Namespace, res: Result, containers: bool) -> None:
    time.sleep(SETTLE)
    idle = status_kb(daemon_pid)
    pods = []
    for i in range(args.mem_pods):
        pod_id, cfg = b.run_pod(f"mem-{i}")
        if containers:
            b.start(b.create(pod_id, cfg, "main", ["sh", "-c", "echo started; exec sleep 3600"]))
        pods.append(pod_id)
    time.sleep(SETTLE)
    res.daemon_delta_kb = max(0, status_kb(daemon_pid) - idle)
    res.pods_held = len(pods)
    for pod_id in pods:
        shim = _shim_of(pod_id)
        if shim:
            res.per_pod_tree_kb.append(tree_pss_kb(shim))
    b.remove_all()


def measure(client: CriClient, daemon_pid: int, handler: str, image: str, pause: str, args: argparse.Namespace,
            log_dir: Path, modes: tuple[str, ...]) -> dict[str, Result]:
    """modes: "full" (pod + one running container), "sandbox" (RunPodSandbox alone), "sandbox-kept"
    (RunPodSandbox alone, pods never stopped: for a runtime that cannot tear them down)."""
    b = HandlerBench(client, image, log_dir, handler)
    b.pull(image)
    if pause:
        b.pull(pause)
    out: dict[str, Result] = {}
    for mode in modes:
        res = out[mode.removesuffix("-kept")] = Result()
        one = b.one_pod if mode == "full" else lambda name: _sandbox_only(b, name)
        kept = mode.endswith("-kept")
        if not kept:
            one("warmup")
            b.remove_all()
            time.sleep(1)
        else:
            time.sleep(SETTLE)
            idle = status_kb(daemon_pid)
        for i in range(args.pods):
            calls = one(f"seq-{i}")
            res.start_s.append(calls.get("end-to-end", calls["RunPodSandbox"]))
            for k, v in calls.items():
                res.calls.setdefault(k, []).append(v)
        if kept:
            time.sleep(SETTLE)
            pods = [p.id for p in client.runtime.ListPodSandbox(client.pb.ListPodSandboxRequest()).items]
            res.daemon_delta_kb, res.pods_held = max(0, status_kb(daemon_pid) - idle), len(pods)
            res.per_pod_tree_kb = [tree_pss_kb(shim) for shim in map(_shim_of, pods) if shim]
            continue
        b.remove_all()
        _memory(b, daemon_pid, args, res, containers=mode == "full")
    return out


def forget_runsc_state(root: str, base: Path) -> None:
    """Delete runsc containers (state files, sandboxes) whose bundle lies under base."""
    runsc = shutil.which("runsc") or "runsc"
    out = subprocess.run([runsc, "--root", root, "list", "--format", "json"], capture_output=True, text=True,
                         timeout=60, check=False).stdout
    try:
        listed = json.loads(out) or []
    except ValueError:
        return
    for c in listed:
        if str(c.get("bundle", "")).startswith(str(base)):
            subprocess.run([runsc, "--root", root, "delete", "--force", c["id"]], capture_output=True, timeout=60,
                           check=False)


def run_shimd(work: Path, reg: Registry, conf_dir: Path, handler: str, image: str, args: argparse.Namespace,
              modes: tuple[str, ...]) -> dict[str, Result]:
    (work / f"shimd-{handler}").mkdir(parents=True, exist_ok=True)
    proc = shimd_proc(work / f"shimd-{handler}", reg, conf_dir)
    try:
        client = proc.start()
        assert proc.proc is not None
        return measure(client, proc.proc.pid, handler, image, "", args, work / f"logs-shimd-{handler}", modes)
    finally:
        proc.stop()
        kill_strays(proc.base)
        namespaces.release_base_dir(proc.state / "ns")


def run_containerd(work: Path, reg: Registry, conf_dir: Path, runc_binary: str, pause: str, image: str,
                   args: argparse.Namespace, tag: str, modes: tuple[str, ...]) -> dict[str, Result]:
    peer = ContainerdPeer(work / f"containerd-{tag}", plain_http_registries=[reg.host], cni_conf_dir=conf_dir,
                          runc_binary=runc_binary, sandbox_image=pause)
    try:
        client = peer.start()
        return measure(client, peer.pid, "", image, pause, args, work / f"logs-containerd-{tag}", modes)
    finally:
        peer.stop()
        kill_strays(peer.base)
        if tag == "runsc":
            forget_runsc_state(CONTAINERD_RUNC_ROOT, peer.base)
            peer.unmount_all()


# --- report ---------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def report(results: dict[str, Result]) -> None:
    print(f"\n{'':28} {'p50 start':>10} {'p95 start':>10} {'per-pod MiB':>12} {'(tree+daemon/N)':>18}")
    for name, r in results.items():
        if r.error:
            print(f"{name:28} could not run: {r.error}")
            continue
        tree = statistics.mean(r.per_pod_tree_kb) / 1024 if r.per_pod_tree_kb else 0
        print(f"{name:28} {pct(r.start_s, 0.5) * 1000:8.0f}ms {pct(r.start_s, 0.95) * 1000:8.0f}ms "
              f"{r.per_pod_kb / 1024:12.1f} {tree:9.1f}+{r.daemon_delta_kb / 1024 / max(r.pods_held, 1):.1f}")
        print(f"{'':28} p50 per call: " + ", ".join(f"{k} {pct(v, 0.5) * 1000:.0f}ms" for k, v in r.calls.items()
                                                     if k != "end-to-end"))
    for kind in ("runsc full", "runsc sandbox", "shimv2 full", "shimv2 sandbox"):
        a, b = results.get(f"shimd {kind}"), results.get(f"containerd {kind}")
        if a and b and not a.error and not b.error:
            print(f"ratio shimd/containerd {kind:15}: start p50 {_ratio(pct(a.start_s, 0.5), pct(b.start_s, 0.5))}, "
                  f"p95 {_ratio(pct(a.start_s, 0.95), pct(b.start_s, 0.95))}, "
                  f"per-pod memory {_ratio(a.per_pod_kb, b.per_pod_kb)}")


def load(path: str) -> dict[str, Result]:
    return {k: Result(**v) for k, v in json.loads(Path(path).read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=20, help="pods started one after another for the latency")
    ap.add_argument("--mem-pods", type=int, default=5, help="pods held at once for the memory figures")
    ap.add_argument("--only", choices=("runsc", "shimv2"), default="")
    ap.add_argument("--json", default="", help="also write raw results here")
    ap.add_argument("--report", default="", help="only print the report of a --json file written earlier")
    args = ap.parse_args()
    if args.report:
        report(load(args.report))
        return

    results: dict[str, Result] = {}
    with bench_workspace("bench-sbx-") as ws:
        work, net, reg, image, pause = ws.work, ws.net, ws.reg, ws.image, ws.pause
        conf_dir = work / "net.d"
        conf_dir.mkdir()
        (conf_dir / "10-bench.conflist").write_text(json.dumps(cni_conf("bridge", net)))
        wrapper = runsc_wrapper(work / "runsc-host")
        # containerd drives runsc only as far as creating sandboxes (see the module docstring).
        plan = [
            ("runsc", "shimd", lambda: run_shimd(work, reg, conf_dir, "runsc", image, args, ("full", "sandbox"))),
            ("runsc", "containerd", lambda: run_containerd(work, reg, conf_dir, str(wrapper), pause, image, args,
                                                           "runsc", ("sandbox-kept",))),
            ("shimv2", "shimd", lambda: run_shimd(work, reg, conf_dir, "runcv2", image, args, ("full", "sandbox"))),
            ("shimv2", "containerd", lambda: run_containerd(work, reg, conf_dir, "runc", pause, image, args, "runc",
                                                            ("full", "sandbox"))),
        ]
        for kind, daemon, run in plan:
            if args.only and kind != args.only:
                continue
            print(f"measuring {daemon} {kind} ...", flush=True)
            try:
                for mode, r in run().items():
                    results[f"{daemon} {kind} {mode}"] = r
            except (grpc.RpcError, RuntimeError, TimeoutError) as e:
                detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                results[f"{daemon} {kind}"] = Result(error=detail[:300])
                traceback.print_exc(limit=-3)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v.__dict__ for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
