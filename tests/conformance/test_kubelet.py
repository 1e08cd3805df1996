"""The kubelet scenario (issue 15): a real standalone kubelet running static pods on a shimd of its own.

The tests run in order against one kubelet and one shimd (a module fixture): pods start, a crashing
container is restarted with back-off, a failed liveness probe restarts a container, shimd is killed and
restarted and kubelet restarted without any container being replaced, logs rotate through
ReopenContainerLog without losing a line, and deleting the manifests leaves nothing behind. kubelet stops
every pod it did not create, so nothing else may share this shimd.
"""

from __future__ import annotations

import contextlib
import gzip
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import critest_images, gotools
from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.kubelet import (
    Kubelet,
    cgroups_under,
    kubelet_iptables_chains,
    make_cgroup_root,
    pids_in_cgroups,
    remove_cgroup_root,
    remove_kubelet_iptables,
)
from tests.support.network import CNI_BIN_DIRS, CniNetwork
from tests.support.otlp import Collector, attributes
from tests.support.procs import alive, procs_for_pod
from tests.support.registry import Registry, start_registry
from tests.support.runtime import kill_strays

# As a user writes it: a short name, which kubelet passes on as is and shimd resolves to the public registry,
# which its mirrors (critest_images.mirrors_toml) send to the test's registry.
IMAGE = "busybox:1.36"
NAMESPACE = "default"

PRINT = "i=0; while true; do echo \"seq $i\"; i=$((i+1)); usleep 20000; done"
# Crashes on its first two runs (the count lives in an emptyDir, which survives restarts), then stays up.
CRASH = ("n=$(cat /data/n 2>/dev/null || echo 0); echo $((n+1)) > /data/n; echo \"run $n\"; "
         "if [ \"$n\" -ge 2 ]; then exec sleep 100000; fi; exit 3")
# Healthy only from its second run on: the first run's liveness probe fails once.
PROBE = "if [ -e /data/once ]; then touch /tmp/healthy; else touch /data/once; fi; exec sleep 100000"


def _pod(name: str, container: dict[str, Any], empty_dir: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 1}
    if empty_dir:
        spec["volumes"] = [{"name": "data", "emptyDir": {}}]
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def _container(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c", script],
            **extra}


MANIFESTS = {
    "printer": _pod("printer", _container("print", PRINT)),
    "crasher": _pod("crasher", _container("crash", CRASH), empty_dir=True),
    "prober": _pod("prober", _container("probe", PROBE, livenessProbe={
        "exec": {"command": ["cat", "/tmp/healthy"]}, "initialDelaySeconds": 2, "periodSeconds": 1,
        "timeoutSeconds": 5, "failureThreshold": 1}), empty_dir=True),
}


@dataclass
class Scenario:
    kubelet: Kubelet
    shimd: ShimdProcess
    registry: Registry
    net: CniNetwork
    cgroup_root: str
    spans: Collector  # shimd's traces: [tracing] points here
    started_after: dict[str, float] = field(default_factory=dict)  # pod -> seconds from manifest to running
    sandboxes_seen: set[str] = field(default_factory=set)

    @property
    def cri(self) -> Any:
        assert self.shimd.client is not None
        return self.shimd.client

    def pod_name(self, name: str) -> str:
        return f"{name}-{self.kubelet.node_name}"  # static pods carry the node's name

    def containers(self, pod: str) -> list[Any]:
        """The pod's containers, every state, oldest attempt first."""
        pb = self.cri.pb
        flt = pb.ContainerFilter(label_selector={"io.kubernetes.pod.name": self.pod_name(pod)})
        items = self.cri.runtime.ListContainers(pb.ListContainersRequest(filter=flt)).containers
        return sorted(items, key=lambda c: (c.metadata.attempt, c.created_at))

    def sandboxes(self) -> list[Any]:
        pb = self.cri.pb
        items = list(self.cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items)
        self.sandboxes_seen |= {s.id for s in items}
        return items

    def running(self, pod: str) -> Any | None:
        pb = self.cri.pb
        up = [c for c in self.containers(pod) if c.state == pb.CONTAINER_RUNNING]
        return up[-1] if up else None

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        """Poll check() until it returns something truthy; fail naming `what` with kubelet's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(grpc.RpcError):
                got = check()
                if got:
                    return got
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n--- kubelet log ---\n{self.kubelet.log_tail()}\n"
                            f"--- shimd log ---\n{self.shimd.log_tail(20)}")
            time.sleep(0.1)

    def snapshot(self) -> dict[str, list[tuple[str, int, int]]]:
        """Per pod: (container id, attempt, state) of every container, and the sandbox ids."""
        out: dict[str, list[tuple[str, int, int]]] = {
            pod: [(c.id, c.metadata.attempt, c.state) for c in self.containers(pod)] for pod in MANIFESTS}
        out["sandboxes"] = sorted((s.id, s.metadata.attempt, s.state) for s in self.sandboxes())
        return out

    def settled(self) -> dict[str, list[tuple[str, int, int]]]:
        """Wait until every pod has its container running (crash and liveness restarts are over)."""
        def ready() -> dict[str, list[tuple[str, int, int]]] | None:
            up = {p: self.running(p) for p in MANIFESTS}
            if not all(up.values()) or up["crasher"].metadata.attempt < 2 or up["prober"].metadata.attempt < 1:
                return None
            return self.snapshot()
        return self.wait("all three pods running", ready, 120)  # type: ignore[no-any-return]


def _free_subnet() -> ipaddress.IPv4Network:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    used = [ipaddress.ip_interface(f.split()[3]).network for f in out.splitlines() if len(f.split()) > 3]
    free = [n for x in range(256) if not any((n := ipaddress.IPv4Network(f"10.124.{x}.0/24")).overlaps(u)
                                             for u in used)]
    return random.choice(free)


def _shimd_config(registry: Registry, net: CniNetwork) -> str:
    return (critest_images.mirrors_toml(registry.url)
            + f'[cni]\nconf_dir = "{net.conf_dir}"\nbin_dirs = {json.dumps(CNI_BIN_DIRS)}\n')


def _stop_pods(s: Scenario) -> None:
    """Teardown, also after a failure: kubelet first (it would recreate pods), then whatever pods are left."""
    s.kubelet.stop()
    if s.shimd.client is not None:
        pb = s.cri.pb
        with contextlib.suppress(grpc.RpcError):
            for p in s.sandboxes():
                s.cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p.id))
                s.cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id))
    s.shimd.stop()
    kill_strays(s.shimd.base)


def _remove_links(pod_logs: Path) -> None:
    """kubelet's /var/log/containers symlinks into the test's pod log dir."""
    for link in Path("/var/log/containers").glob("*.log"):
        with contextlib.suppress(OSError):
            if os.readlink(link).startswith(str(pod_logs)):
                link.unlink()


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    from shimd.network.namespaces import release_base_dir

    binary = gotools.tool("kubelet")
    tag = f"{random.getrandbits(24):06x}"
    cgroup_root = f"shimd-kubelet-{tag}"
    with contextlib.ExitStack() as undo:
        # Each piece is undone, in reverse order, as soon as it exists: also when a later one fails to start.
        base = Path(tempfile.mkdtemp(prefix="shimd-kl-"))
        undo.callback(shutil.rmtree, base, ignore_errors=True)
        if keep := os.environ.get("SHIMD_KEEP_KUBELET_LOGS"):  # for debugging: the logs survive the test
            undo.callback(shutil.copytree, base, keep, dirs_exist_ok=True,
                          ignore=shutil.ignore_patterns("storage", "*.sock", "*.lock"))
        undo.callback(kill_strays, base)
        net = CniNetwork(name=f"shimdkl-{tag}", bridge=f"shkl{tag}", subnet=_free_subnet(), root=base / "cni")
        undo.callback(net.cleanup)
        net.ns_dir.mkdir(parents=True)
        net.write()
        registry = start_registry(base / "registry")
        undo.callback(registry.stop)
        # Where the mirror serves a short name (library/NAME); Debian's busybox-static is enough here.
        name, tag = IMAGE.split(":")
        registry.client().push_image(f"library/{name}", tag, img.busybox_image())
        (base / "shimd").mkdir()
        spans = Collector()
        undo.callback(spans.close)
        # kubelet traces too, as a node with tracing on does: its own spans go to a port that refuses them
        # (bound, never listening), the context it sends with each CRI call is what shimd's spans join.
        refusing = undo.enter_context(contextlib.closing(socket.socket()))
        refusing.bind(("127.0.0.1", 0))
        shimd = ShimdProcess(base / "shimd", _shimd_config(registry, net)
                             + f'[tracing]\nendpoint = "http://127.0.0.1:{spans.port}"\n')
        kubelet = Kubelet(binary, base / "kubelet", shimd.socket, cgroup_root,
                          tracing_endpoint=f"127.0.0.1:{refusing.getsockname()[1]}")
        undo.callback(remove_kubelet_iptables, kubelet_iptables_chains())
        undo.callback(_remove_links, kubelet.pod_logs)
        undo.callback(remove_cgroup_root, cgroup_root)
        undo.callback(release_base_dir, shimd.state / "ns")
        s = Scenario(kubelet, shimd, registry, net, cgroup_root, spans)
        undo.callback(_stop_pods, s)
        make_cgroup_root(cgroup_root)
        shimd.start()
        kubelet.start()
        kubelet.wait_healthy()
        written = {}
        for name, pod in MANIFESTS.items():
            kubelet.write_manifest(name, pod)
            written[name] = time.monotonic()
        # Manifest written -> first container running (the first includes pulling the image), by CRI status.
        pending = set(MANIFESTS)
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                with contextlib.suppress(grpc.RpcError):
                    if any(c.state == s.cri.pb.CONTAINER_RUNNING for c in s.containers(name)):
                        s.started_after[name] = time.monotonic() - written[name]
                        pending.discard(name)
            time.sleep(0.02)
        print("\nkubelet scenario: manifest written -> container running: "
              + ", ".join(f"{n} {t:.2f} s" for n, t in s.started_after.items()))
        if pending:
            pytest.fail(f"never running: {sorted(pending)}\n--- kubelet log ---\n{kubelet.log_tail()}\n"
                        f"--- shimd log ---\n{shimd.log_tail(30)}")
        yield s


def test_static_pods_start_and_log(scenario: Scenario) -> None:
    s = scenario
    pattern = f"{NAMESPACE}_{s.pod_name('printer')}_*"
    pod = s.wait("the printer's pod log dir", lambda: list(s.kubelet.pod_logs.glob(pattern)), 30)
    log = pod[0] / "print" / "0.log"
    text = s.wait("lines in the printer's log", lambda: log.exists() and "seq 3" in _read_all(log.parent), 30)
    assert text
    # The CRI log format, written by the shim: timestamp, stream, tag, text.
    first = _read_all(log.parent).splitlines()[0]
    assert re.fullmatch(r"\S+Z stdout [FP] seq \d+", first), first


def test_kubelets_trace_context_reaches_shimds_spans(scenario: Scenario) -> None:
    """kubelet (tracing on) sends a W3C traceparent with its CRI calls: shimd's spans of them are children
    of kubelet's spans, which shimd never made itself."""
    s = scenario
    pods = {p.id for p in s.sandboxes()}
    runs = s.spans.until(lambda sp: sp.name == "runtime.v1.RuntimeService/RunPodSandbox"
                         and attributes(sp).get("shimd.pod_id") in pods, "of kubelet's RunPodSandbox", timeout=30)
    for run in runs:
        assert run.parent_span_id, "RunPodSandbox from kubelet has no parent span"
        assert not s.spans.find(lambda sp, run=run: sp.span_id == run.parent_span_id), "the parent is shimd's own"
    started = s.spans.until(lambda sp: sp.name == "runtime.v1.RuntimeService/StartContainer", "of StartContainer",
                            timeout=30)
    assert all(sp.parent_span_id for sp in started)


def test_crash_is_restarted_with_back_off(scenario: Scenario) -> None:
    s = scenario
    pb = s.cri.pb
    s.settled()
    # Two crashes, then a run that stays up (kubelet removes all but the last exited container, soon).
    ctrs = s.containers("crasher")
    assert [c.metadata.attempt for c in ctrs] == list(range(3 - len(ctrs), 3))
    assert ctrs[-1].state == pb.CONTAINER_RUNNING
    for c in ctrs[:-1]:
        st = s.cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id)).status
        assert st.state == pb.CONTAINER_EXITED and st.exit_code == 3, (st.state, st.exit_code)
    # kubelet held the restarts back rather than restarting at once.
    assert re.search(r"CrashLoopBackOff|[Bb]ack-off \d+s restarting failed container", s.kubelet.log_text()), \
        "kubelet never reported a back-off for the crashing container"


def test_failed_liveness_probe_restarts_the_container(scenario: Scenario) -> None:
    s = scenario
    pb = s.cri.pb
    s.settled()
    ctrs = s.containers("prober")
    assert [c.metadata.attempt for c in ctrs] == [0, 1]
    first = s.cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=ctrs[0].id)).status
    assert first.state == pb.CONTAINER_EXITED
    assert ctrs[1].state == pb.CONTAINER_RUNNING
    assert re.search(r"probeType=\"Liveness\".*probeResult=\"failure\"|failed liveness probe", s.kubelet.log_text()), \
        "kubelet's log does not show the liveness failure"


def _observe_no_restarts(s: Scenario, before: dict[str, list[tuple[str, int, int]]], what: str) -> None:
    """Several kubelet sync periods (syncFrequency 3 s, PLEG every second): nothing is replaced."""
    for _ in range(4):
        time.sleep(3)
        assert s.snapshot() == before, f"containers or sandboxes changed after {what}"
        status, body = s.kubelet.healthz()
        assert (status, body.strip()) == (200, "ok"), f"kubelet /healthz after {what}: {status} {body!r}"


def test_shimd_restart_restarts_no_container(scenario: Scenario) -> None:
    s = scenario
    before = s.settled()
    mark = len(s.kubelet.log_text())
    s.shimd.kill()  # a crash: SIGKILL, shims and containers keep running
    s.shimd.start()
    s.kubelet.wait_healthy(timeout=30)
    _observe_no_restarts(s, before, "the shimd restart")
    # kubelet's PLEG relists every second; it never went stale enough to count as unhealthy.
    assert "PLEG is not healthy" not in s.kubelet.log_text()[mark:]


def test_kubelet_restart_adopts_the_pods(scenario: Scenario) -> None:
    s = scenario
    before = s.settled()
    s.kubelet.stop()
    mark = len(s.kubelet.log_text())
    s.kubelet.start()
    s.kubelet.wait_healthy()
    # kubelet has read the manifests again and synced the pods it found running.
    s.wait("kubelet to sync the static pods after its restart",
           lambda: all(s.pod_name(p) in s.kubelet.log_text()[mark:] for p in MANIFESTS), 60)
    _observe_no_restarts(s, before, "the kubelet restart")


def _read_all(container_dir: Path) -> str:
    """Every log file of a container directory, rotated (and gzipped) ones first, in rotation order."""
    for _ in range(20):  # kubelet may compress or remove a file while we read: take another snapshot
        try:
            files = sorted(container_dir.iterdir(), key=_rotation_key)
            return "".join(gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()
                           for f in files)
        except (FileNotFoundError, EOFError, gzip.BadGzipFile):
            time.sleep(0.05)
    raise AssertionError(f"could not read a consistent set of logs in {container_dir}")


def _rotation_key(f: Path) -> tuple[int, str]:
    # 0.log.20261204-154512 (.gz) are rotated copies, named by rotation time; 0.log is the live file.
    m = re.fullmatch(r"(\d+)\.log(?:\.(\d{8}-\d{6}))?(?:\.gz)?", f.name)
    assert m, f"unexpected file in a container log dir: {f}"
    return int(m.group(1)), m.group(2) or "99999999-999999"


def test_every_running_container_has_its_log_file(scenario: Scenario) -> None:
    """kubelet's log reader and rotation expect the CRI log file from StartContainer on, also for a container
    that has written nothing (the prober); finding none, kubelet calls ReopenContainerLog, which must create
    it. Issue 15 items 1 and 2: fixed on another branch; on this one the silent container has no file and
    kubelet logs "Failed to stat container log after reopen"."""
    s = scenario
    pb = s.cri.pb
    s.settled()
    missing = []
    for pod in MANIFESTS:
        c = s.running(pod)
        path = s.cri.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=c.id)).status.log_path
        if not os.path.exists(path):
            missing.append(path)
    assert not missing, f"running containers without their CRI log file (issue 15 items 1-2): {missing}"
    assert "Failed to stat container log after reopen" not in s.kubelet.log_text(), \
        "ReopenContainerLog did not create the missing log file (issue 15 item 2)"


def test_log_rotation_keeps_every_line(scenario: Scenario) -> None:
    """kubelet renames the log file and calls ReopenContainerLog; the shim must go on in a new file."""
    s = scenario
    pod_dir = next(s.kubelet.pod_logs.glob(f"{NAMESPACE}_{s.pod_name('printer')}_*"))
    ctr_dir = pod_dir / "print"
    rotated = s.wait("two log rotations (kubelet renames 0.log, then ReopenContainerLog)",
                     lambda: len([f for f in ctr_dir.iterdir() if f.name != "0.log"]) >= 2 or None, 45)
    assert rotated
    text = _read_all(ctr_dir)
    lines = text.split("\n")[:-1]  # the live file's last line may still be incomplete
    seqs = [int(m.group(1)) for m in (re.fullmatch(r"\S+Z stdout F seq (\d+)", line) for line in lines) if m]
    assert len(seqs) == len(lines), "a log line is not in the CRI format"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), \
        f"lines lost or repeated across rotations: {_gaps(seqs)}"
    assert (ctr_dir / "0.log").stat().st_size < 4 * 8192, "the live log is not being rotated"
    ids = {c.id for c in s.containers("printer")}
    failed = [line for line in s.kubelet.log_text().splitlines()
              if "Failed to rotate log for container" in line and any(i in line for i in ids)
              and "connection refused" not in line]  # shimd's restart window: kubelet renames the file back
    assert not failed, f"kubelet could not rotate the printer's log: {failed[:3]}"


def _gaps(seqs: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1][:10]


def test_deleting_the_manifests_leaves_nothing(scenario: Scenario) -> None:
    s = scenario
    s.settled()
    sandboxes = {p.id for p in s.sandboxes()} | s.sandboxes_seen
    container_pids = pids_in_cgroups(s.cgroup_root)
    assert container_pids, "the pods' processes are not in kubelet's cgroup root"
    for f in s.kubelet.manifests.glob("*.json"):
        f.unlink()
    # kubelet stops the pods at once; its container GC (once a minute) removes containers, sandboxes and logs.
    s.wait("kubelet to remove every sandbox and container",
           lambda: not s.sandboxes() and not s.cri.runtime.ListContainers(s.cri.pb.ListContainersRequest()).containers,
           150)
    s.wait("the pod log directories to go", lambda: not any(s.kubelet.pod_logs.iterdir()), 90)
    s.wait("the pod cgroups to go", lambda: not cgroups_under(s.cgroup_root, "pod"), 30)
    assert not [p for p in container_pids if alive(p)], "container processes outlived their pods"
    assert not [p for sid in sandboxes for p in procs_for_pod(sid)], "shims outlived their pods"
    assert not pids_in_cgroups(s.cgroup_root)
    links = [link for link in Path("/var/log/containers").glob("*.log")
             if str(os.readlink(link)).startswith(str(s.kubelet.pod_logs))]
    assert not links, f"kubelet's /var/log/containers links left: {links}"
    state, root = s.shimd.state, s.shimd.root
    assert not list((state / "ns").glob("*")), "namespace pins left"
    assert not list((root / "pods").glob("*.json")) and not list((root / "containers").glob("*.json"))
    assert not s.net.allocations(), "IP leases left"
    mounts = [line.split()[4] for line in open("/proc/self/mountinfo")
              if str(s.shimd.base) in line and line.split()[4] != str(state / "ns")]
    assert not mounts, f"mounts left: {mounts}"
    assert not list((s.kubelet.root_dir / "pods").glob("*")), "kubelet's pod directories left"
    # shimd was SIGKILLed and restarted earlier; stopped now with no pod left, nothing of it may stay.
    s.kubelet.stop()
    s.shimd.stop()
    s.wait("shimd's zygote and shims to end", lambda: not _processes_naming(s.shimd.base), 10)
    mounts = [line.split()[4] for line in open("/proc/self/mountinfo") if str(s.shimd.base) in line]
    assert not mounts, f"mounts left after shimd stopped: {mounts}"


def _processes_naming(base: Path) -> list[int]:
    """Live processes whose command line names the directory (shimd, the zygote, shims started by it)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(base).encode() in f.read() and alive(int(pid)):
                        found.append(int(pid))
    return found
