"""The floors under pod start and teardown on this machine (issue 18): what no runtime can go below.

  * `runc create` + `runc start` of a minimal container (static catatonit, runc's default namespaces,
    no network), and `runc kill` + `runc delete`;
  * each CNI plugin of the bridge network bench_pod_start uses, ADD and DEL, executed directly with
    the same stdin a runtime gives it, in a netns pinned under a private directory.

    .venv/bin/python -m tests.bench.bench_floors --runs 20

Run it next to bench_pod_start's figures (same load): the CNI numbers are the plugins' own exec
time, which both runtimes pay on RunPodSandbox and StopPodSandbox. Beside each wall time, the machine's
CPU time over the step (all processes, /proc/stat): the floor under bench_pod_start's "machine CPU per
pod", which bounds how many pods start at once on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_pod_start import machine_cpu_s, private_network
from tests.support.network import CNI_BIN_DIRS

CATATONIT = "/usr/bin/catatonit"


# Wall and machine CPU seconds of one step.
Sample = tuple[float, float]


def timed(argv: list[str]) -> Sample:
    t0, c0 = time.perf_counter(), machine_cpu_s()
    # No pipes: the container's init inherits runc create's stdio and would hold them open.
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60)
    return time.perf_counter() - t0, machine_cpu_s() - c0


def runc_floor(work: Path, runs: int) -> dict[str, list[Sample]]:
    bundle, root = work / "bundle", work / "runc-root"
    (bundle / "rootfs").mkdir(parents=True)
    root.mkdir()
    shutil.copy2(CATATONIT, bundle / "rootfs" / "catatonit")
    for d in ("proc", "dev", "sys"):
        (bundle / "rootfs" / d).mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True, timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(args=["/catatonit", "-P"], terminal=False)
    spec["linux"]["cgroupsPath"] = f"/shimd-floor-{os.getpid()}"
    (bundle / "config.json").write_text(json.dumps(spec))
    out: dict[str, list[Sample]] = {"runc create": [], "runc start": [], "runc create+start": [],
                                   "runc run --detach": [], "runc kill+delete": []}
    base = ["runc", "--root", str(root)]
    try:
        for i in range(runs):
            cid = f"floor{i}"
            c = timed([*base, "create", "--bundle", str(bundle), cid])
            s = timed([*base, "start", cid])
            out["runc kill+delete"].append(kill_delete(base, cid))
            # The same container made running by one runc process (what a shim can do for a pause task).
            out["runc run --detach"].append(timed([*base, "run", "--detach", "--bundle", str(bundle), cid]))
            kill_delete(base, cid)
            out["runc create"].append(c)
            out["runc start"].append(s)
            out["runc create+start"].append((c[0] + s[0], c[1] + s[1]))
    finally:
        # Never leave a container (and its cgroup) behind a failed run.
        left = subprocess.run([*base, "list", "-q"], capture_output=True, text=True, timeout=30).stdout.split()
        for cid in left:
            subprocess.run([*base, "delete", "--force", cid], capture_output=True, timeout=30)
    return out


def kill_delete(base: list[str], cid: str) -> Sample:
    """Wall time from SIGKILL to deleted; CPU of `runc kill` and `runc delete` only (not the state polls)."""
    t0, c0 = time.perf_counter(), machine_cpu_s()
    subprocess.run([*base, "kill", cid, "KILL"], check=True, capture_output=True, timeout=30)
    cpu = machine_cpu_s() - c0
    deadline = t0 + 30
    while json.loads(subprocess.run([*base, "state", cid], capture_output=True, timeout=30,
                                    check=True).stdout)["status"] != "stopped":
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{cid} still running 30 s after SIGKILL")
        time.sleep(0.001)
    c1 = machine_cpu_s()
    subprocess.run([*base, "delete", cid], check=True, capture_output=True, timeout=30)
    return time.perf_counter() - t0, cpu + machine_cpu_s() - c1


def cni_floor(work: Path, runs: int) -> dict[str, list[Sample]]:
    net = private_network(work / "cni")
    conf = net.conflist()
    # The plugins that run for a pod without port mappings or bandwidth annotations.
    conf["plugins"] = [p for p in conf["plugins"] if p["type"] in ("bridge", "loopback")]
    pin_dir = work / "ns"
    pin_dir.mkdir()
    out: dict[str, list[Sample]] = {}
    try:
        for i in range(runs):
            pin = pin_dir / f"n{i}"
            pin.touch()
            subprocess.run(["unshare", f"--net={pin}", "true"], check=True, timeout=30)
            cid = f"shimdfloor{os.getpid()}x{i}"
            prev: dict[str, Any] | None = None  # ADD: the previous plugin's result; DEL: the chain's
            for command, order in (("ADD", conf["plugins"]), ("DEL", list(reversed(conf["plugins"])))):
                for p in order:
                    stdin = {**p, "name": conf["name"], "cniVersion": conf["cniVersion"]}
                    if prev is not None:
                        stdin["prevResult"] = prev
                    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": str(pin),
                           "CNI_IFNAME": "eth0", "CNI_PATH": ":".join(CNI_BIN_DIRS),
                           "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
                    path = next(Path(d) / p["type"] for d in CNI_BIN_DIRS if (Path(d) / p["type"]).exists())
                    t0, c0 = time.perf_counter(), machine_cpu_s()
                    r = subprocess.run([str(path)], input=json.dumps(stdin).encode(), env=env, capture_output=True,
                                       timeout=60)
                    out.setdefault(f"cni {command} {p['type']}", []).append((time.perf_counter() - t0,
                                                                             machine_cpu_s() - c0))
                    if r.returncode != 0:
                        raise RuntimeError(f"{p['type']} {command}: {r.stdout!r} {r.stderr!r}")
                    if command == "ADD":
                        prev = json.loads(r.stdout)
            subprocess.run(["umount", str(pin)], check=False, timeout=30)
    finally:
        net.cleanup()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-floors-", dir="/tmp"))
    try:
        rows = {**runc_floor(work, args.runs), **cni_floor(work, args.runs)}
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
    print(f"\n{'floor (ms)':<24}{'p50':>8}{'mean':>8}{'CPU mean':>10}   load {os.getloadavg()[0]:.1f}")
    for name, samples in rows.items():
        walls, cpus = [w for w, _ in samples], [c for _, c in samples]
        print(f"{name:<24}{statistics.median(walls) * 1000:>8.1f}{statistics.mean(walls) * 1000:>8.1f}"
              f"{statistics.mean(cpus) * 1000:>10.1f}")


if __name__ == "__main__":
    main()
