"""Invariant checks for the fault-tolerance tests: what shimd lists must match what exists.

Every object a test's shimd ever made is known from its private root (records are written before
anything else is created), so leaks are found by id even for a RunPodSandbox whose reply was lost
to a SIGKILL.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.runtime import Runtime

CGROUP_ROOT = Path("/sys/fs/cgroup")


def record_ids(rt: Runtime) -> tuple[set[str], set[str]]:
    """(pod ids, container ids) with a record in shimd's root right now."""
    def ids(d: Path) -> set[str]:
        try:
            return {n[:-5] for n in os.listdir(d) if n.endswith(".json") and not n.startswith(".")}
        except FileNotFoundError:
            return set()

    return ids(rt.proc.root / "pods"), ids(rt.proc.root / "containers")


def pod_cgroup_dirs(pod_id: str) -> list[Path]:
    """The default per-pod parent cgroup (/shimd/pod<id16>) in every hierarchy."""
    out = []
    for h in CGROUP_ROOT.iterdir():
        d = h / "shimd" / f"pod{pod_id[:16]}"
        if d.is_dir():
            out.append(d)
    return out


def cgroup_pids(d: Path) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(d):
        if "cgroup.procs" in files:
            try:
                pids += [int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()]
            except OSError:
                pass
    return pids


def mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4] for line in f if line.split(" ")[4].startswith(str(base))]


def proc_texts() -> dict[int, bytes]:
    """Command line and environment of every process (shims carry their pod's id and paths)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] == b"Z":
            continue  # exited; an orphan waits for a PID 1 that may never reap it
        # Shims forked by the zygote share its command line; their name carries the pod id's start.
        out[int(pid)] = cmd + b"\0" + env + b"\0comm=" + comm
    return out


def procs_mentioning(text: str, texts: dict[int, bytes] | None = None) -> list[int]:
    needle, comm = text.encode(), f"\0comm=shim-{text[:10]}".encode()
    return [pid for pid, blob in (texts if texts is not None else proc_texts()).items()
            if needle in blob or blob.endswith(comm)]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def runc_ids(root: Path) -> set[str]:
    """Containers runc knows under a handler root (every task of every pod of this daemon)."""
    if not root.exists():
        return set()
    out = subprocess.run(["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30,
                         check=False)
    return set(out.stdout.split())


def explain(rt: Runtime, problems: list[str]) -> str:
    """The problems, plus shimd's log lines about the objects they name (how they got there)."""
    ids = {w for p in problems for w in re.findall(r"[0-9a-f]{64}", p)}
    try:
        log = rt.proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        log = []
    # ...and about the pods those objects belong to.
    ids |= {m for ln in log if any(i in ln for i in ids) for m in re.findall(r'"pod_id": "([0-9a-f]{64})"', ln)}
    lines = [ln[:400] for ln in log if any(i in ln for i in ids)]
    return "\n".join(problems) + ("\n--- shimd log about them:\n" + "\n".join(lines[-60:]) if lines else "")


@dataclass
class Expect:
    """What the test knows for sure about a container (None = unknown after an interrupted call)."""
    pod_id: str
    exit_code: int | None = None


@dataclass
class Checker:
    rt: Runtime
    seen_pods: set[str] = field(default_factory=set)
    seen_containers: set[str] = field(default_factory=set)

    def note_disk(self) -> None:
        pods, ctrs = record_ids(self.rt)
        self.seen_pods |= pods
        self.seen_containers |= ctrs

    def listed(self) -> tuple[dict[str, Any], dict[str, Any]]:
        pb = self.rt.pb
        pods = {p.id: p for p in self.rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items}
        ctrs = {c.id: c for c in self.rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers}
        self.seen_pods |= set(pods)
        self.seen_containers |= set(ctrs)
        return pods, ctrs

    def check(self, expected_exits: dict[str, Expect] | None = None, settle: float = 10.0) -> list[str]:
        """Every invariant; retried for `settle` seconds because exits are recorded asynchronously."""
        deadline = time.monotonic() + settle
        while True:
            problems = self._check_once(expected_exits or {})
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.25)

    def _check_once(self, expected_exits: dict[str, Expect]) -> list[str]:
        pb = self.rt.pb
        problems: list[str] = []
        self.note_disk()
        pods, ctrs = self.listed()
        disk_pods, disk_ctrs = record_ids(self.rt)
        # 1. Nothing listed that does not exist on disk.
        problems += [f"pod {p} listed without a record" for p in pods if p not in disk_pods]
        problems += [f"container {c} listed without a record" for c in ctrs if c not in disk_ctrs]
        problems += [f"container {c} listed in unlisted pod {x.pod_sandbox_id}"
                     for c, x in ctrs.items() if x.pod_sandbox_id not in pods]
        # ...and records that are not listed are leaks (a finished teardown deletes its record).
        problems += [f"pod record {p} not listed" for p in disk_pods - set(pods)]
        problems += [f"container record {c} not listed" for c in disk_ctrs - set(ctrs)]

        # 2. Runtime agrees: a running container has a live task, nothing else has one.
        tasks = runc_ids(self.rt.proc.state / "runc")
        running = {c for c, x in ctrs.items() if x.state == pb.CONTAINER_RUNNING}
        problems += [f"running container {c} has no runc task" for c in running if c not in tasks]
        for t in tasks - running:
            if t in pods:
                # A pod's pause task (shared PID namespace pods). A NOTREADY pod may still hold it when a
                # StopPodSandbox was cut short: the pod is listed and kubelet repeats the stop.
                continue
            what = f"a container in state {ctrs[t].state}" if t in ctrs else "unknown to shimd"
            problems.append(f"runc task {t} is {what}")

        # 3. Exit codes are right where the test knows them.
        for cid, exp in expected_exits.items():
            x = ctrs.get(cid)
            if x is None or exp.exit_code is None:
                continue
            if x.state == pb.CONTAINER_EXITED:
                st = self.rt.client.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status
                if st.exit_code != exp.exit_code:
                    problems.append(f"container {cid} exit code {st.exit_code}, expected {exp.exit_code}")

        # 4. Nothing left of pods shimd no longer lists: cgroups, processes, namespace pins, mounts.
        gone = self.seen_pods - set(pods)
        texts = proc_texts() if gone else {}
        for p in gone:
            for d in pod_cgroup_dirs(p):
                pids = cgroup_pids(d)
                problems.append(f"cgroup {d} of removed pod {p} left" + (f" with pids {pids}" if pids else ""))
            left = procs_mentioning(p, texts)
            if left:
                shown = [texts[pid].split(b"\0\0")[0].replace(b"\0", b" ")[:200].decode(errors="replace")
                         for pid in left]
                problems.append(f"processes of removed pod {p} left: {dict(zip(left, shown, strict=True))}")
        ns_dir = self.rt.proc.state / "ns"
        if ns_dir.exists():
            for pin in os.listdir(ns_dir):
                if not any(pin.startswith(p) for p in pods):
                    problems.append(f"namespace pin {pin} of an unlisted pod")
        state = self.rt.proc.state
        for m in mounts_under(self.rt.proc.base):
            if m == str(state / "ns"):
                continue
            if not any(i in m for i in (*pods, *ctrs)):
                problems.append(f"mount {m} belongs to nothing listed")
        # 5. Containers that are not running hold no mount of their root filesystem.
        for c, x in ctrs.items():
            if x.state != pb.CONTAINER_RUNNING:
                problems += [f"mount {m} of {x.state and 'stopped'} container {c}"
                             for m in mounts_under(self.rt.proc.base) if c in m and m.endswith("rootfs")]
        return problems

    def check_empty(self, shimd_fds_baseline: int | None = None) -> list[str]:
        """After everything was removed: no trace of any object this daemon ever made."""
        problems = self.check()
        pods, ctrs = self.listed()
        problems += [f"pod {p} still listed" for p in pods] + [f"container {c} still listed" for c in ctrs]
        if runc_ids(self.rt.proc.state / "runc"):
            problems.append(f"runc tasks left: {runc_ids(self.rt.proc.state / 'runc')}")
        if shimd_fds_baseline is not None and self.rt.proc.proc is not None:
            fds = fd_count(self.rt.proc.proc.pid)
            if fds > shimd_fds_baseline + 8:
                problems.append(f"shimd holds {fds} fds, {shimd_fds_baseline} when it started")
        return problems
