"""Pod start latency and memory: shimd vs a private containerd 1.6, both on runc, same CRI client.

For each runtime (shimd first, then containerd; never both at once) with the same busybox image
from a local registry and the same CNI config (loopback-only or a private NAT'ed bridge):

  * N pods sequentially, then N in parallel, each RunPodSandbox + CreateContainer + StartContainer:
    p50/p95 per call and end to end;
  * after the timing rounds, in a pass of its own: daemon RSS idle and with --rss-pods pods (each with a
    running container), and at that many pods the per-pod node memory: the shims' PSS summed over the
    pods, plus the daemon's growth per pod (then also the pause processes' PSS). This is the figure to
    compare: the one-shim PSS below counts the shim binary's pages as private to that shim (for
    containerd's Go shim most of its 12 MiB), which with a hundred shims are shared a hundred ways;
  * ListContainers p50 with --containers containers (created, not started) across --list-pods pods
    (one runtime after the other; bench_list times the same with both up and batches interleaved,
    which keeps the machine's drift out of the ratio);
  * one pod's shim (with one running container): RSS and PSS (/proc/PID/smaps_rollup);
  * shimd only: per-phase time of the sequential pods' calls (start and teardown), from shimd's
    shimd_phase_duration_seconds histogram: mean (exact) and p50 (interpolated within a bucket);
  * with --perf: the parallel phase's CPU per pod by kind of process (daemon, shims, runc, CNI plugins,
    pause processes, ...), from `perf record -a` (tests/bench/cpu_by_process.py).

containerd needs a sandbox (pause) image: one is built from the static /usr/bin/catatonit
(entrypoint ["/catatonit", "-P"]) and pushed next to busybox. Everything runs under a private
temp dir and is removed at the end (pods, daemons, registry, bridge, nat rules).

    .venv/bin/python -m tests.bench.bench_pod_start --network loopback|bridge|host --pods 20

containerd 1.6 fails every RunPodSandbox on a loopback-only network ("failed to find network info
for sandbox": it requires an eth0 address), so --network loopback measures shimd alone; --network
host (host-network pods: no netns, no CNI on either side) is the network-free comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import ipaddress
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from shimd.network import namespaces
from tests.bench import cpu_by_process
from tests.bench.containerd_peer import ContainerdPeer
from tests.support import images as img
from tests.support import procs as support_procs
from tests.support.cri_client import CriClient
from tests.support.daemon import ShimdProcess
from tests.support.network import CniNetwork
from tests.support.registry import Registry, start_registry
from tests.support.runtime import LOOPBACK_CONFLIST, kill_strays

CATATONIT = "/usr/bin/catatonit"
nan = float("nan")
CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer", "end-to-end")
# Sequential teardown of running pods: StopPodSandbox alone (then RemovePodSandbox), and the four
# calls kubelet makes (StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox).
TEARDOWN = ("StopPodSandbox", "RemovePodSandbox", "teardown-4")
PARALLEL_WORKERS = 20
SETUP_WORKERS = 8


# --- images and CNI -------------------------------------------------------------------------------------


def push_pause(reg: Registry) -> str:
    with open(CATATONIT, "rb") as f:
        binary = f.read()
    layer = img.make_layer([
        img.Entry("file", "catatonit", binary, mode=0o755),
        *(img.Entry("dir", d, mode=0o755) for d in ("dev", "proc", "sys", "etc")),
    ])
    man = img.make_image([layer], extra_config={"Entrypoint": ["/catatonit", "-P"], "Cmd": None})
    return reg.client().push_image("bench/pause", "3.9", man)


def push_bench_busybox(reg: Registry) -> str:
    """tests.support's busybox, but with hard link entries carrying the binary's mode 0755.

    containerd applies a hard link entry's mode to the shared inode (as real images always carry
    the target's mode there); with the default 0644 the binary would end up non-executable.
    """
    entries = [dataclasses.replace(e, mode=0o755) if e.kind == "hardlink" else e for e in img.busybox_entries()]
    man = img.make_image([img.make_layer(entries)])
    return reg.client().push_image("bench/busybox", "1", man)


def cni_conf(kind: str, net: CniNetwork) -> dict[str, Any]:
    if kind in ("loopback", "host"):
        return dict(LOOPBACK_CONFLIST)
    conf = net.conflist()
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": str(net.subnet)}]]
    return conf


def private_network(root: Path) -> CniNetwork:
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    x = random.choice([x for x in range(0, 256, 4) if f"10.124.{x}." not in used])
    tag = f"{random.getrandbits(24):06x}"
    return CniNetwork(name=f"shimdbench-{tag}", bridge=f"shbn{tag}", subnet=ipaddress.IPv4Network(f"10.124.{x}.0/22"),
                      root=root)


# --- runtimes -------------------------------------------------------------------------------------------


class Runtime:
    """The two daemons behind one interface: start/stop, client, daemon pid, shim of a pod."""

    name = ""

    def start(self) -> CriClient:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        raise NotImplementedError


class Shimd(Runtime):
    name = "shimd"

    def __init__(self, base: Path, registry: Registry, conf_dir: Path) -> None:
        self.metrics_port = free_port()
        # daemon.state on tmpfs as shimd's default makes it; containerd's state gets one too (ContainerdPeer).
        self.proc = ShimdProcess(base, f'[registries.hosts."{registry.host}"]\ninsecure = true\n'
                                       f'[cni]\nconf_dir = "{conf_dir}"\n'
                                       '[streaming]\naddress = "127.0.0.1:0"\n'
                                       f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n',
                                 state_tmpfs=True)
        # ShimdProcess logs at debug level for tests; benchmark at the level a node would use.
        text = self.proc.config_path.read_text().replace('log_level = "debug"', 'log_level = "info"')
        self.proc.config_path.write_text(text)

    def start(self) -> CriClient:
        try:
            return self.proc.start()
        except BaseException:
            self.stop()  # a daemon that started but cannot be used still mounted its state's tmpfs
            raise

    def stop(self) -> None:
        self.proc.stop()
        kill_strays(self.proc.base)
        namespaces.release_base_dir(self.proc.state / "ns")
        self.proc.unmount_state()

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid


class Containerd(Runtime):
    name = "containerd"

    def __init__(self, base: Path, registry: Registry, conf_dir: Path, pause: str) -> None:
        self.peer = ContainerdPeer(base, plain_http_registries=[registry.host], cni_conf_dir=conf_dir,
                                   sandbox_image=pause, state_tmpfs=True)

    def start(self) -> CriClient:
        return self.peer.start()

    def stop(self) -> None:
        self.peer.stop()

    @property
    def pid(self) -> int:
        return self.peer.pid


# --- measurements ---------------------------------------------------------------------------------------


@dataclass
class Results:
    seq: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CALLS})
    par: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CALLS})
    par_wall: float = 0.0
    par_walls: list[float] = field(default_factory=list)  # one per round
    down: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in TEARDOWN})
    list_pods_ms: list[float] = field(default_factory=list)  # ListPodSandbox with the sequential pods up
    seq_cpu: float = 0.0  # machine-wide CPU seconds per pod (daemon, shims, runc, CNI plugins and this client)
    par_cpu: float = 0.0
    # --perf: the parallel phase's CPU seconds per pod by kind of process (cpu_by_process), one dict per round.
    par_by_kind: list[dict[str, float]] = field(default_factory=list)
    rss_idle_kb: int = 0
    rss_pods_kb: int = 0
    # With the rss pods up: the PSS of their shims and of their pause processes, summed, and how many pods.
    pods_mem_kb: dict[str, int] = field(default_factory=dict)
    list_p50_ms: float = 0.0
    list_count: int = 0
    shim_mem: dict[str, int] = field(default_factory=dict)
    # shimd only, the sequential pods' calls: (rpc, phase) -> (calls, seconds, [(le, calls in bucket or below)])
    phases: PhaseSnapshot = field(default_factory=dict)

    def merge(self, other: Results) -> None:
        """Adds another round's samples (the scalar figures keep the last round's)."""
        for mine, theirs in ((self.seq, other.seq), (self.par, other.par), (self.down, other.down)):
            for k, v in theirs.items():
                mine.setdefault(k, []).extend(v)
        self.par_walls += other.par_walls
        self.par_by_kind += other.par_by_kind
        self.list_pods_ms += other.list_pods_ms
        for key, (n, total, buckets) in other.phases.items():
            n0, t0, b0 = self.phases.get(key, (0.0, 0.0, []))
            old = dict(b0)
            self.phases[key] = (n0 + n, t0 + total, [(le, c + old.get(le, 0.0)) for le, c in buckets])
        for name in ("seq_cpu", "par_cpu", "rss_idle_kb", "rss_pods_kb", "pods_mem_kb", "list_p50_ms", "list_count",
                     "shim_mem"):
            if getattr(other, name):
                setattr(self, name, getattr(other, name))


# What kubelet puts in every CreateContainer of a container without a procMount or resources of its own
# (k8s.io/kubernetes v1.36 pkg/securitycontext and pkg/kubelet/kuberuntime).
KUBELET_MASKED = ["/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                  "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                  "/sys/devices/virtual/powercap"]
KUBELET_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
KUBELET_BEST_EFFORT = {"cpu_shares": 2, "cpu_period": 100000, "oom_score_adj": 1000}


@functools.cache
def kubelet_masked_paths() -> tuple[str, ...]:
    """kubelet adds each CPU's thermal_throttle directory where the node has one (looked up once, not for
    every container the client sends in a timed phase)."""
    cpus = sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/thermal_throttle"),
                  key=lambda p: int(p.split("/")[5][3:]))
    return (*KUBELET_MASKED, *cpus)


class Bench:
    def __init__(self, client: CriClient, image: str, log_dir: Path, host_network: bool,
                 shared_pid: bool = False) -> None:
        self.host_network = host_network
        # shareProcessNamespace: true -- one PID namespace for the pod (shimd: a catatonit pause task,
        # containerd: its pause container), else kubelet's default of one per container.
        self.shared_pid = shared_pid
        self.c = client
        self.pb = client.pb
        self.image = image
        self.log_dir = log_dir
        self.seq = 0

    def pod_config(self, name: str) -> Any:
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=f"uid-{name}", attempt=0),
            hostname="" if self.host_network else name, log_directory=str(self.log_dir / name),
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
                    network=pb.NODE if self.host_network else pb.POD, pid=self.pid_mode()))))

    def pid_mode(self) -> Any:
        return self.pb.POD if self.shared_pid else self.pb.CONTAINER

    def container_config(self, name: str, command: list[str]) -> Any:
        """A BestEffort container's config as kubelet (1.36) sends it: the /proc masks of its default
        procMount and its CPU shares, CFS period and OOM score. Without the masks containerd makes its
        containers with none, so its runc would mount 17 paths fewer than under kubelet."""
        pb = self.pb
        return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=0),
                                  image=pb.ImageSpec(image=self.image), command=command, log_path=f"{name}.log",
                                  linux=pb.LinuxContainerConfig(
                                      resources=pb.LinuxContainerResources(**KUBELET_BEST_EFFORT),
                                      security_context=pb.LinuxContainerSecurityContext(
                                          namespace_options=pb.NamespaceOption(
                                              network=pb.NODE if self.host_network else pb.POD, pid=self.pid_mode()),
                                          masked_paths=kubelet_masked_paths(), readonly_paths=KUBELET_READONLY)))

    def run_pod(self, name: str) -> tuple[str, Any]:
        cfg = self.pod_config(name)
        resp = self.c.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=cfg), timeout=120)
        return resp.pod_sandbox_id, cfg

    def create(self, pod_id: str, cfg: Any, name: str, command: list[str]) -> str:
        return self.c.runtime.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=self.container_config(name, command), sandbox_config=cfg),
            timeout=120).container_id

    def start(self, cid: str) -> None:
        self.c.runtime.StartContainer(self.pb.StartContainerRequest(container_id=cid), timeout=120)

    def one_pod(self, name: str) -> dict[str, float]:
        """RunPodSandbox + CreateContainer + StartContainer; seconds per call and end to end."""
        t0 = time.perf_counter()
        pod_id, cfg = self.run_pod(name)
        t1 = time.perf_counter()
        cid = self.create(pod_id, cfg, "main", ["sleep", "3600"])
        t2 = time.perf_counter()
        self.start(cid)
        t3 = time.perf_counter()
        return {"RunPodSandbox": t1 - t0, "CreateContainer": t2 - t1, "StartContainer": t3 - t2, "end-to-end": t3 - t0}

    def fill_containers(self, containers: int, pods: int) -> None:
        """`containers` sleeping containers, created and not started, spread over `pods` new pods."""
        made = [self.run_pod(f"list-{i}") for i in range(pods)]

        def make(i: int) -> str:
            pod_id, cfg = made[i % len(made)]
            return self.create(pod_id, cfg, f"c{i}", ["sleep", "3600"])

        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            list(pool.map(make, range(containers)))

    def one_pod_ids(self, name: str) -> tuple[str, str]:
        pod_id, cfg = self.run_pod(name)
        cid = self.create(pod_id, cfg, "main", ["sleep", "3600"])
        self.start(cid)
        return pod_id, cid

    def stop_remove(self, pod_id: str) -> tuple[float, float]:
        """StopPodSandbox of a pod with a running container, then RemovePodSandbox: seconds of each."""
        rt, pb = self.c.runtime, self.pb
        t0 = time.perf_counter()
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        t1 = time.perf_counter()
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        return t1 - t0, time.perf_counter() - t1

    def teardown_four(self, pod_id: str, cid: str) -> float:
        """kubelet's order for a pod going away (grace period 0: SIGKILL straight away on both runtimes)."""
        rt, pb = self.c.runtime, self.pb
        t0 = time.perf_counter()
        rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        return time.perf_counter() - t0

    def list_pods(self, runs: int) -> list[float]:
        req = self.pb.ListPodSandboxRequest()
        for _ in range(20):  # the same warm-up as ListContainers below
            self.c.runtime.ListPodSandbox(req, timeout=60)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.c.runtime.ListPodSandbox(req, timeout=60)
            times.append(time.perf_counter() - t0)
        return times

    def remove_all(self) -> None:
        pb = self.pb
        pods = self.c.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items

        def rm(pod_id: str) -> None:
            self.c.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
            self.c.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)

        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            list(pool.map(rm, [p.id for p in pods]))

    def pull(self, ref: str) -> None:
        self.c.images.PullImage(self.pb.PullImageRequest(image=self.pb.ImageSpec(image=ref)), timeout=300)


def status_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def smaps_kb(pid: int) -> dict[str, int]:
    out = {"RSS": status_kb(pid)}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("Pss", "Private_Clean", "Private_Dirty"):
                out[key] = int(line.split()[1])
    out["Private"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out



def pods_memory_kb(pod_ids: list[str]) -> dict[str, int]:
    """PSS summed over the pods' shims, and over their pause processes (a shim's child named catatonit,
    containerd's pause image, or pause, shimd's pause task), with the number of pods."""
    out = {"pods": len(pod_ids), "shims": 0, "pause": 0}
    for pod_id in pod_ids:
        for shim in shim_pids(pod_id):
            out["shims"] += smaps_kb(shim)["Pss"]
            for child in _children(shim):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() in ("catatonit", "pause"):
                        out["pause"] += smaps_kb(child)["Pss"]
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


@dataclass
class Workspace:
    """What every benchmark starts from: a scratch dir, a private CNI network, a registry with the images."""

    work: Path
    net: CniNetwork
    reg: Registry
    image: str
    pause: str


@contextlib.contextmanager
def bench_workspace(prefix: str, parent: str = "/tmp") -> Iterator[Workspace]:
    """Both runtimes' directories, the registry and the CNI state in one directory under parent."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    net = private_network(work / "cni")
    reg = start_registry(work / "registry")
    try:
        yield Workspace(work, net, reg, push_bench_busybox(reg), push_pause(reg))
    finally:
        reg.stop()
        net.cleanup()
        # --one-file-system: never follow a mount a failed run left behind into the host.
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def shim_pids(pod_id: str) -> list[int]:
    """The long-running shim serving pod_id (either runtime passes `-id <pod id>`), not start/delete helpers."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"-id" in argv and pod_id.encode() in argv and b"start" not in argv and b"delete" not in argv \
                and any(b"shim" in a for a in argv[:6]):
            found.append(int(pid))
    # shimd's shims forked by its zygote carry the pod in their name, not on their command line.
    return found or support_procs.shim_pids(pod_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PhaseSnapshot = dict[tuple[str, str], tuple[float, float, list[tuple[float, float]]]]


def phase_snapshot(rt: Runtime) -> PhaseSnapshot:
    """shimd's phase histograms: (rpc, phase) -> (count, sum, [(le, cumulative count)]); {} for containerd."""
    if not isinstance(rt, Shimd):
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{rt.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: PhaseSnapshot = {}
    for family in text_string_to_metric_families(text):
        if family.name != "shimd_phase_duration_seconds":
            continue
        for s in family.samples:
            key = (s.labels["rpc"], s.labels["phase"])
            count, total, buckets = out.get(key, (0.0, 0.0, []))
            if s.name.endswith("_count"):
                count = s.value
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_bucket"):
                buckets = [*buckets, (float(s.labels["le"]), s.value)]
            out[key] = (count, total, buckets)
    return out


def bucket_p50(buckets: list[tuple[float, float]], count: float) -> float:
    """The median, interpolated linearly inside the bucket that holds it (as PromQL's histogram_quantile)."""
    want, lower, below = count / 2, 0.0, 0.0
    for le, cum in sorted(buckets):
        if cum >= want and cum > below:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (want - below) / (cum - below)
        lower, below = le, cum
    return float("nan")


def phase_delta(before: PhaseSnapshot, after: PhaseSnapshot) -> PhaseSnapshot:
    out: PhaseSnapshot = {}
    for key, (count, total, buckets) in after.items():
        c0, t0, b0 = before.get(key, (0.0, 0.0, []))
        if count - c0 <= 0:
            continue
        old = dict(b0)
        out[key] = (count - c0, total - t0, [(le, cum - old.get(le, 0.0)) for le, cum in buckets])
    return out


def phase_rows(snap: PhaseSnapshot) -> list[tuple[str, str, int, float, float]]:
    """(rpc, phase, calls, mean ms, p50 ms)."""
    return [(*key, int(n), total / n * 1000, bucket_p50(buckets, n) * 1000)
            for key, (n, total, buckets) in snap.items()]


def machine_cpu_s() -> float:
    """CPU time the whole machine has spent busy (user, nice, system, irq, softirq), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields[:3]) + sum(fields[5:7])) / os.sysconf("SC_CLK_TCK")


def measure(rt: Runtime, image: str, pause: str, args: argparse.Namespace, work: Path, timing: bool = True,
            sizing: bool = True) -> Results:
    """timing: the latency phases; sizing: memory and the ListContainers fill, which leave hundreds of
    freed inodes behind on a disk filesystem (ext4 without a journal then scans past them for 30 s), so
    main() runs them in a pass of their own after all the timing rounds."""
    res = Results()
    client = rt.start()
    b = Bench(client, image, work / f"logs-{rt.name}", args.network == "host", args.pid == "pod")
    try:
        b.pull(image)
        if isinstance(rt, Containerd):
            b.pull(pause)
        b.one_pod("warmup")
        b.remove_all()
        time.sleep(1)
        res.rss_idle_kb = status_kb(rt.pid)

        if timing:
            phases0 = phase_snapshot(rt)
            cpu0 = machine_cpu_s()
            for i in range(args.pods):
                for k, v in b.one_pod(f"seq-{i}").items():
                    res.seq[k].append(v)
            res.seq_cpu = (machine_cpu_s() - cpu0) / args.pods
            res.list_pods_ms = [t * 1000 for t in b.list_pods(args.list_runs)]
            for p in b.c.runtime.ListPodSandbox(b.pb.ListPodSandboxRequest(), timeout=60).items:
                stop, remove = b.stop_remove(p.id)
                res.down["StopPodSandbox"].append(stop)
                res.down["RemovePodSandbox"].append(remove)
            res.phases = phase_delta(phases0, phase_snapshot(rt))
            for i in range(args.pods):
                res.down["teardown-4"].append(b.teardown_four(*b.one_pod_ids(f"down-{i}")))

            profiling = cpu_by_process.record(work, rt.pid, os.getpid()) if args.perf else contextlib.nullcontext()
            with profiling as profile:
                t0, cpu0 = time.perf_counter(), machine_cpu_s()
                with ThreadPoolExecutor(PARALLEL_WORKERS) as pool:
                    for one in pool.map(lambda i: b.one_pod(f"par-{i}"), range(args.pods)):
                        for k, v in one.items():
                            res.par[k].append(v)
                res.par_wall = time.perf_counter() - t0
                res.par_cpu = (machine_cpu_s() - cpu0) / args.pods
            res.par_walls = [res.par_wall]
            if profile is not None and profile.seconds:
                res.par_by_kind = [{k: v / args.pods for k, v in profile.seconds.items()}]
            b.remove_all()

        if sizing:
            # One pod's shim with one running container.
            pod_id, cfg = b.run_pod("shim-mem")
            b.start(b.create(pod_id, cfg, "main", ["sleep", "3600"]))
            time.sleep(args.settle)
            pids = shim_pids(pod_id)
            if len(pids) == 1:
                res.shim_mem = smaps_kb(pids[0])
            else:
                print(f"[{rt.name}] shim of pod {pod_id} not identified: {pids}")
            b.remove_all()

            if args.rss_pods:
                # Pods as kubelet runs them: each with a running container.
                with ThreadPoolExecutor(SETUP_WORKERS) as pool:
                    ids = list(pool.map(lambda i: b.one_pod_ids(f"rss-{i}"), range(args.rss_pods)))
                time.sleep(args.settle)
                res.rss_pods_kb = status_kb(rt.pid)
                res.pods_mem_kb = pods_memory_kb([pod_id for pod_id, _ in ids])
                b.remove_all()

            if args.containers:
                b.fill_containers(args.containers, args.list_pods)
                req = client.pb.ListContainersRequest()
                # kubelet lists every second on one long-lived connection: time that steady state, after
                # the same warm-up for both runtimes (the client's HTTP/2 window grows over the first calls).
                for _ in range(args.list_warmup):
                    client.runtime.ListContainers(req, timeout=60)
                times = []
                for _ in range(args.list_runs):
                    t0 = time.perf_counter()
                    res.list_count = len(client.runtime.ListContainers(req, timeout=60).containers)
                    times.append(time.perf_counter() - t0)
                res.list_p50_ms = statistics.median(times) * 1000
                b.remove_all()
    except BaseException:
        # Never leave pods (and their shims, netns, cgroups) behind a failed run.
        with contextlib.suppress(Exception):
            b.remove_all()
        raise
    finally:
        rt.stop()
    return res


# --- report ---------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and a == a and b == b else "-"  # x == x is False for NaN


def _mean_kind(r: Results, kind: str) -> float:
    return statistics.mean(d.get(kind, 0.0) for d in r.par_by_kind) if r.par_by_kind else nan


def report(results: dict[str, Results], args: argparse.Namespace) -> None:
    ours, theirs = results["shimd"], results["containerd"]
    print(f"\nnetwork={args.network} pid={args.pid} pods={args.pods} (times in ms; ratio = shimd / containerd)")
    print(f"{'phase':<10}{'call':<17}{'shimd p50':>10}{'p95':>8}{'ctrd p50':>10}{'p95':>8}{'ratio p50':>11}"
          f"{'ratio p95':>11}")
    for phase in ("seq", "par"):
        for call in CALLS:
            a, b = getattr(ours, phase)[call], getattr(theirs, phase)[call]
            a50, a95, b50, b95 = (pct(v, q) * 1000 for v, q in ((a, .5), (a, .95), (b, .5), (b, .95)))
            print(f"{phase:<10}{call:<17}{a50:>10.0f}{a95:>8.0f}{b50:>10.0f}{b95:>8.0f}{ratio(a50, b50):>11}"
                  f"{ratio(a95, b95):>11}")
    for call in TEARDOWN:
        a, b = ours.down[call], theirs.down[call]
        a50, a95, b50, b95 = (pct(v, q) * 1000 for v, q in ((a, .5), (a, .95), (b, .5), (b, .95)))
        print(f"{'down':<10}{call:<17}{a50:>10.1f}{a95:>8.1f}{b50:>10.1f}{b95:>8.1f}{ratio(a50, b50):>11}"
              f"{ratio(a95, b95):>11}")
    wa, wb = statistics.median(ours.par_walls or [nan]), statistics.median(theirs.par_walls or [nan])
    print(f"{'par':<10}{'wall (all pods)':<17}{wa * 1000:>10.0f}{'':>8}{wb * 1000:>10.0f}"
          f"{'':>8}{ratio(wa, wb):>11}   (median of {len(ours.par_walls)}/{len(theirs.par_walls)} rounds:"
          f" {[round(w * 1000) for w in ours.par_walls]} / {[round(w * 1000) for w in theirs.par_walls]})")
    la, lb = pct(ours.list_pods_ms, .5), pct(theirs.list_pods_ms, .5)
    print(f"{'list':<10}{f'ListPodSandbox {args.pods}':<17}{la:>10.2f}{'':>8}{lb:>10.2f}{'':>8}{ratio(la, lb):>11}")

    def row(label: str, a: float, b: float, unit: str) -> None:
        print(f"{label:<40}{a:>12.1f}{b:>14.1f}{ratio(a, b):>8}  {unit}")

    print(f"\n{'':<40}{'shimd':>12}{'containerd':>14}{'ratio':>8}")
    row("machine CPU per pod, sequential", ours.seq_cpu * 1000, theirs.seq_cpu * 1000, "ms")
    row("machine CPU per pod, parallel", ours.par_cpu * 1000, theirs.par_cpu * 1000, "ms")
    if ours.par_by_kind or theirs.par_by_kind:
        print(f"\n{args.pods} pods at once, CPU per pod by process (perf -a, mean of {len(ours.par_by_kind)}/"
              f"{len(theirs.par_by_kind)} rounds)")
        kinds = sorted({k for r in (ours, theirs) for d in r.par_by_kind for k in d},
                       key=lambda k: -_mean_kind(ours, k) - _mean_kind(theirs, k))
        for kind in kinds:
            row(f"  {kind}", _mean_kind(ours, kind) * 1000, _mean_kind(theirs, kind) * 1000, "ms")
        row("  all", sum(_mean_kind(ours, k) for k in kinds) * 1000, sum(_mean_kind(theirs, k) for k in kinds) * 1000,
            "ms")

    print(f"\n{'':<40}{'shimd':>12}{'containerd':>14}{'ratio':>8}")
    row("daemon RSS idle", ours.rss_idle_kb / 1024, theirs.rss_idle_kb / 1024, "MiB")
    if args.rss_pods:
        row(f"daemon RSS with {args.rss_pods} pods", ours.rss_pods_kb / 1024, theirs.rss_pods_kb / 1024, "MiB")
        # The figure: per pod, its shim's PSS plus the daemon's growth, at that many running pods.
        per_pod = {}
        for name, r in (("ours", ours), ("theirs", theirs)):
            n = max(r.pods_mem_kb.get("pods", 0), 1)
            growth = (r.rss_pods_kb - r.rss_idle_kb) / n
            per_pod[name] = ((r.pods_mem_kb.get("shims", 0) / n + growth) / 1024,
                             (r.pods_mem_kb.get("pause", 0) / n) / 1024)
        row(f"per pod at {args.rss_pods}: shim PSS + daemon growth", per_pod["ours"][0], per_pod["theirs"][0], "MiB")
        row(f"per pod at {args.rss_pods}: that + pause PSS", sum(per_pod["ours"]), sum(per_pod["theirs"]), "MiB")
    if args.containers:
        row(f"ListContainers p50 ({ours.list_count}/{theirs.list_count} ctrs)", ours.list_p50_ms,
            theirs.list_p50_ms, "ms")
    for key in ("RSS", "Pss", "Private"):
        row(f"one shim {key} (1 running container)", ours.shim_mem.get(key, 0) / 1024,
            theirs.shim_mem.get(key, 0) / 1024, "MiB")
    if ours.phases:
        order = {"RunPodSandbox": 0, "CreateContainer": 1, "StartContainer": 2, "StopPodSandbox": 3,
                 "RemovePodSandbox": 4}
        print("\nshimd phases, sequential pods (ms; p50 interpolated within a histogram bucket)")
        print(f"{'call':<18}{'phase':<22}{'calls':>6}{'mean':>9}{'p50':>9}")
        for rpc, phase, n, mean, p50 in sorted(phase_rows(ours.phases), key=lambda r: (order.get(r[0], 9), -r[3])):
            print(f"{rpc:<18}{phase:<22}{n:>6}{mean:>9.2f}{p50:>9.2f}")
    if args.json:
        raw = {k: {**v.__dict__, "phases": phase_rows(v.phases)} for k, v in results.items()}
        Path(args.json).write_text(json.dumps(raw, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", choices=("loopback", "bridge", "host"), default="loopback",
                    help="CNI config: loopback only, or a NAT'ed bridge; host: host-network pods (no netns, no CNI)")
    ap.add_argument("--pid", choices=("container", "pod"), default="container",
                    help="PID namespace per container (kubelet's default) or one per pod (shareProcessNamespace)")
    ap.add_argument("--pods", type=int, default=20, help="pods per latency phase (sequential, then parallel)")
    ap.add_argument("--rss-pods", type=int, default=100, help="pods held while reading daemon RSS (0: skip)")
    ap.add_argument("--containers", type=int, default=500, help="containers for the ListContainers timing (0: skip)")
    ap.add_argument("--list-pods", type=int, default=25, help="pods the --containers are spread over")
    ap.add_argument("--list-runs", type=int, default=200)
    ap.add_argument("--list-warmup", type=int, default=20, help="untimed ListContainers calls first")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds before reading memory")
    ap.add_argument("--only", choices=("shimd", "containerd"), default="", help="measure one runtime only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each runtime this many times, alternating which goes first; samples pooled")
    ap.add_argument("--json", default="", help="also write raw results here")
    ap.add_argument("--perf", action="store_true",
                    help="record the pods-at-once phase with `perf record -a` and report its CPU by process kind")
    ap.add_argument("--workdir", default="/tmp",
                    help="where both runtimes keep their state, records, logs and layers (a tmpfs there takes "
                         "the disk out of the figures)")
    args = ap.parse_args()

    results: dict[str, Results] = {}
    with bench_workspace("bench-pods-", args.workdir) as ws:
        work, net, reg, image, pause = ws.work, ws.net, ws.reg, ws.image, ws.pause
        conf = cni_conf(args.network, net)
        makers: list[tuple[str, Callable[[Path, Path], Runtime]]] = [
            ("shimd", lambda base, d: Shimd(base, reg, d)),
            ("containerd", lambda base, d: Containerd(base, reg, d, pause)),
        ]

        def fresh(name: str, make: Callable[[Path, Path], Runtime], tag: str) -> tuple[Runtime, Path]:
            """A runtime of its own directory and CNI config directory (named by tag) for one measure()."""
            base, conf_dir = work / f"{name}-{tag}", work / f"net.d-{name}-{tag}"
            base.mkdir()
            conf_dir.mkdir()
            (conf_dir / "10-bench.conflist").write_text(json.dumps(conf))
            return make(base, conf_dir), base

        for r in range(args.rounds):
            # Alternate which runtime goes first, so the machine's drift over a run hits both alike.
            for name, make in (makers if r % 2 == 0 else makers[::-1]):
                if args.only and name != args.only:
                    results.setdefault(name, Results())
                    continue
                print(f"round {r}: measuring {name} ...", flush=True)
                try:
                    rt, base = fresh(name, make, str(r))
                    res = measure(rt, image, pause, args, base, sizing=False)
                except grpc.RpcError as e:
                    # containerd 1.6 insists on an address for eth0, which a loopback-only network never gives.
                    print(f"[{name}] cannot run this benchmark: {e.code().name}: {e.details()}")
                    res = Results()
                results.setdefault(name, Results()).merge(res)
        for name, make in makers:
            if args.only and name != args.only:
                continue
            print(f"memory and lists: measuring {name} ...", flush=True)
            rt, base = fresh(name, make, "sizes")
            with contextlib.suppress(grpc.RpcError):  # reported by the timing rounds already
                results[name].merge(measure(rt, image, pause, args, base, timing=False))
    report(results, args)


if __name__ == "__main__":
    main()
