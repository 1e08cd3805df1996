"""A standalone kubelet (no API server, static pods from a manifest directory) for the conformance tests,
with everything private to one test: root and cert dirs, ports, pod log dir, a cgroup root of its own and
the CRI endpoint of a shimd the test started.

kubelet insists on a few kernel tunables (vm.overcommit_memory=1, kernel.panic=10, ...) and would rewrite
them for the whole host. It runs in a mount namespace of its own (slave propagation: the host's mounts reach
it, its own mounts stay inside) where those /proc/sys files are bind-mounted with the values it expects, and
with protectKernelDefaults on, so it only checks them and never writes the host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.procs import terminate
from tests.support.registry import free_port

# What kubelet's setupKernelTunables wants to read (pkg/util/sysctl's constants).
KERNEL_TUNABLES = {
    "vm/overcommit_memory": 1,
    "vm/panic_on_oom": 0,
    "kernel/panic": 10,
    "kernel/panic_on_oops": 1,
    "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}
CGROUP_MOUNTS = Path("/sys/fs/cgroup")


def cgroup_hierarchies() -> list[Path]:
    """Every mounted hierarchy under /sys/fs/cgroup (v1 controllers, name=systemd, the unified one)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point, fstype = fields[4], fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2") and mount_point.startswith(f"{CGROUP_MOUNTS}/"):
                out.append(Path(mount_point))
    return sorted(set(out))


def make_cgroup_root(name: str) -> None:
    """kubelet requires its cgroupRoot to exist in every hierarchy."""
    for h in cgroup_hierarchies():
        d = h / name
        d.mkdir(exist_ok=True)
        if (h / "cpuset.cpus").exists():
            # A new cpuset starts empty; its tasks could run nowhere.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if not (d / knob).read_text().strip():
                    (d / knob).write_text((h / knob).read_text())


def cgroups_under(name: str, prefix: str = "") -> list[Path]:
    """Cgroup directories below the root `name` whose own name starts with prefix."""
    found = []
    for h in cgroup_hierarchies():
        for dirpath, dirnames, _ in os.walk(h / name):
            found += [Path(dirpath) / d for d in dirnames if d.startswith(prefix)]
    return found


def pids_in_cgroups(name: str) -> set[int]:
    pids: set[int] = set()
    for h in cgroup_hierarchies():
        for dirpath, _, filenames in os.walk(h / name):
            if "cgroup.procs" in filenames:
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()}
    return pids


IPTABLES = ("iptables", "ip6tables")
IPTABLES_TABLES = ("filter", "nat", "mangle")


def kubelet_iptables_chains() -> set[tuple[str, str, str]]:
    """(tool, table, chain) of every KUBE-* chain in the host's network namespace."""
    found = set()
    for tool in IPTABLES:
        for table in IPTABLES_TABLES:
            out = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True, timeout=20).stdout
            found |= {(tool, table, line[1:].split()[0]) for line in out.splitlines() if line.startswith(":KUBE-")}
    return found


def remove_kubelet_iptables(before: set[tuple[str, str, str]]) -> None:
    """kubelet adds KUBE-* chains (and KUBE-FIREWALL rules in INPUT/OUTPUT) to the host: take out those that
    were not there before it started, the rules that jump to them first."""
    added = kubelet_iptables_chains() - before
    for tool, table in {(t, tb) for t, tb, _ in added}:
        chains = {c for t, tb, c in added if (t, tb) == (tool, table)}
        out = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True, timeout=20).stdout
        for rule in out.splitlines():
            parts = rule.split()
            if rule.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in chains \
                    and parts[1] not in chains:
                subprocess.run([tool, "-w", "-t", table, "-D", *parts[1:]], capture_output=True, timeout=20)
        for chain in chains:
            subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True, timeout=20)
        for chain in chains:
            subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True, timeout=20)


def remove_cgroup_root(name: str) -> None:
    """Kill what is left inside, then rmdir bottom-up (cgroupfs directories cannot be removed recursively)."""
    for pid in pids_in_cgroups(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for h in cgroup_hierarchies():
        top = h / name
        if not top.exists():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            for _ in range(50):  # killed tasks take a moment to leave the cgroup
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


class Kubelet:
    """One kubelet process; start() and stop() can be called repeatedly (a kubelet restart)."""

    def __init__(self, binary: Path, base: Path, runtime_socket: str, cgroup_root: str,
                 node_name: str = "shimd-kubelet-node", tracing_endpoint: str = "") -> None:
        """tracing_endpoint: host:port of an OTLP/gRPC collector; kubelet then traces every pod sync and
        CRI call (all sampled) and sends the trace context along with its CRI requests."""
        self.binary, self.base, self.node_name = binary, base, node_name
        self.root_dir = base / "root"
        self.cert_dir = base / "certs"
        self.manifests = base / "manifests"
        self.pod_logs = base / "pod-logs"
        self.config_path = base / "kubelet-config.json"
        self.log_path = base / "kubelet.log"
        self.tunables = base / "tunables"
        for d in (self.root_dir, self.cert_dir, self.manifests, self.pod_logs, self.tunables):
            d.mkdir(parents=True, exist_ok=True)
        self.port, self.healthz_port = free_port(), free_port()
        self.config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{runtime_socket}",
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "syncFrequency": "3s",
            "podLogsDir": str(self.pod_logs),
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": True,
            "cgroupRoot": f"/{cgroup_root}",
            "failSwapOn": False,
            "failCgroupV1": False,  # this host mounts the v1 controllers
            "protectKernelDefaults": True,
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # Small files and a short check interval, so rotations (ReopenContainerLog) happen within the test.
            "containerLogMaxSize": "8Ki",
            "containerLogMaxFiles": 5,
            "containerLogMonitorInterval": "3s",
            # The shared test machine's disk and memory must not make kubelet evict or collect the test's pods.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "registerNode": False,
        }
        if tracing_endpoint:
            self.config["tracing"] = {"endpoint": tracing_endpoint, "samplingRatePerMillion": 1000000}
        self.config_path.write_text(json.dumps(self.config, indent=2))
        for rel, value in KERNEL_TUNABLES.items():
            (self.tunables / rel.replace("/", "_")).write_text(f"{value}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        binds = " && ".join(f"mount --bind {self.tunables / rel.replace('/', '_')} /proc/sys/{rel}"
                            for rel in KERNEL_TUNABLES)
        # exec: unshare, sh and kubelet are one process, so its pid is kubelet's.
        script = f'{binds} && exec "$0" "$@"'
        return ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, str(self.binary),
                f"--config={self.config_path}", f"--root-dir={self.root_dir}", f"--cert-dir={self.cert_dir}",
                f"--hostname-override={self.node_name}", "--v=2"]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== kubelet start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=log, start_new_session=True)

    def healthz(self) -> tuple[int, str]:
        """kubelet's /healthz (its sync loop and PLEG checks): (HTTP status, body), (0, error) if unreachable."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/healthz", timeout=5) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kubelet exited with {self.proc.returncode}:\n{self.log_tail()}")
            status, body = self.healthz()
            if status == 200 and body.strip() == "ok":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"kubelet /healthz: {status} {body!r}\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        terminate(self.proc, 20, 10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def write_manifest(self, name: str, pod: dict[str, object]) -> Path:
        """Atomically, so kubelet's file source never reads half a manifest."""
        path = self.manifests / f"{name}.json"
        tmp = self.manifests / f".{name}.tmp"  # kubelet ignores dot files
        tmp.write_text(json.dumps(pod))
        os.replace(tmp, path)
        return path
