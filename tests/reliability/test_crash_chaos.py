"""SIGKILL shimd at random points during random CRI operations; after each restart every invariant holds.

Sizes come from the environment so `make test` runs a short version and `make soak` the full one:
SHIMD_CHAOS_OPS (40 / 200), SHIMD_CHAOS_KILL_P (chance of a kill per operation), SHIMD_CHAOS_SEED.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.support.network import NetRuntime, nat_rules, rules_of
from tests.support.reliability import Checker, Expect, explain, fd_count
from tests.support.runtime import Runtime

OPS = int(os.environ.get("SHIMD_CHAOS_OPS", "40"))
KILL_P = float(os.environ.get("SHIMD_CHAOS_KILL_P", "0.12"))
SEED = int(os.environ.get("SHIMD_CHAOS_SEED", str(int(time.time()))))
MAX_PODS = 5
# Statuses a correct runtime may answer to a well-formed request in a racing, restarting world.
ACCEPTABLE = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}


@dataclass
class Model:
    pod_cfgs: dict[str, Any] = field(default_factory=dict)  # pod id -> PodSandboxConfig
    expect: dict[str, Expect] = field(default_factory=dict)  # container id -> what is known
    names: int = 0


class Chaos:
    def __init__(self, rt: Runtime, rng: random.Random) -> None:
        self.rt, self.rng = rt, rng
        self.pb = rt.pb
        self.model = Model()
        self.checker = Checker(rt)
        self.kills = 0
        self.log: list[str] = []

    # --- calls that may be interrupted ---------------------------------------------------
    def call(self, stub: str, method: str, req: Any, kill: bool) -> Any:
        """The RPC; with kill, shimd is SIGKILLed a random moment after the request went out."""
        fn = getattr(getattr(self.rt.client, stub), method)
        if not kill:
            return fn(req, timeout=60)
        fut = fn.future(req, timeout=60)
        time.sleep(self.rng.uniform(0.0, 0.4))
        self.crash(f"during {method}")
        try:
            return fut.result(timeout=10)
        except grpc.RpcError:
            return None
        except grpc.FutureTimeoutError:
            return None

    def crash(self, where: str) -> None:
        self.kills += 1
        self.log.append(f"SIGKILL {where}")
        # Records are written before anything else is made: note them before recovery deletes some.
        self.rt.proc.kill()
        self.checker.note_disk()
        t0 = time.monotonic()
        try:
            self.rt.proc.start(timeout=60)
        except Exception as e:
            raise AssertionError(f"shimd did not come back {time.monotonic() - t0:.1f}s after SIGKILL {where} "
                                 f"(seed {SEED}; ops {self.log}): {e!r}\n{self.rt.proc.log_tail(60)}") from e
        self.resync()
        problems = self.checker.check(self.model.expect)
        assert not problems, f"after restart ({where}; seed {SEED}; ops {self.log}):\n" + explain(self.rt, problems)

    def resync(self) -> None:
        """Adopt what the restarted daemon lists: the interrupted call may or may not have happened."""
        pods, ctrs = self.checker.listed()
        for pid, p in pods.items():
            if pid not in self.model.pod_cfgs:
                self.model.pod_cfgs[pid] = self.rt.pod_config(p.metadata.name, uid=p.metadata.uid)
        for pid in list(self.model.pod_cfgs):
            if pid not in pods:
                del self.model.pod_cfgs[pid]
        for cid, c in ctrs.items():
            self.model.expect.setdefault(cid, Expect(c.pod_sandbox_id, None))
        for cid in list(self.model.expect):
            if cid not in ctrs:
                del self.model.expect[cid]

    # --- operations ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.checker.listed()

    def op_run_pod(self, kill: bool) -> None:
        self.model.names += 1
        cfg = self.rt.pod_config(f"chaos{self.model.names}")
        resp = self.call("runtime", "RunPodSandbox", self.pb.RunPodSandboxRequest(config=cfg), kill)
        if resp is not None:
            self.model.pod_cfgs[resp.pod_sandbox_id] = cfg

    def op_create(self, kill: bool, pods: dict[str, Any]) -> None:
        ready = [p for p, x in pods.items() if x.state == self.pb.SANDBOX_READY and p in self.model.pod_cfgs]
        if not ready:
            return self.op_run_pod(kill)
        pod_id = self.rng.choice(ready)
        code = self.rng.randrange(0, 10)
        kind = self.rng.choice(["sleep", "exit", "sleepexit"])
        command = {"sleep": ["sleep", "1000"], "exit": ["sh", "-c", f"exit {code}"],
                   "sleepexit": ["sh", "-c", f"sleep 1; exit {code}"]}[kind]
        self.model.names += 1
        cfg = self.rt.container_config(f"c{self.model.names}", command)
        resp = self.call("runtime", "CreateContainer", self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=cfg, sandbox_config=self.model.pod_cfgs[pod_id]), kill)
        if resp is not None:
            self.model.expect[resp.container_id] = Expect(pod_id, None if kind == "sleep" else code)
        return None

    def pick(self, ctrs: dict[str, Any], state: int) -> str | None:
        ids = [c for c, x in ctrs.items() if x.state == state]
        return self.rng.choice(ids) if ids else None

    def op_start(self, kill: bool, ctrs: dict[str, Any]) -> None:
        cid = self.pick(ctrs, self.pb.CONTAINER_CREATED)
        if cid:
            self.call("runtime", "StartContainer", self.pb.StartContainerRequest(container_id=cid), kill)

    def op_stop(self, kill: bool, ctrs: dict[str, Any]) -> None:
        cid = self.pick(ctrs, self.pb.CONTAINER_RUNNING)
        if cid:
            self.model.expect[cid].exit_code = None  # killed by a signal: its code is the runtime's choice
            self.call("runtime", "StopContainer", self.pb.StopContainerRequest(container_id=cid, timeout=1), kill)

    def op_remove(self, kill: bool, ctrs: dict[str, Any]) -> None:
        cid = self.pick(ctrs, self.pb.CONTAINER_EXITED) or self.pick(ctrs, self.pb.CONTAINER_CREATED)
        if cid:
            self.call("runtime", "RemoveContainer", self.pb.RemoveContainerRequest(container_id=cid), kill)

    def op_exec(self, kill: bool, ctrs: dict[str, Any]) -> None:
        cid = self.pick(ctrs, self.pb.CONTAINER_RUNNING)
        if not cid:
            return
        resp = self.call("runtime", "ExecSync", self.pb.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "echo out; exit 3"], timeout=10), kill)
        # The container may exit on its own between listing and exec; then any answer is fine.
        if resp is not None and self.rt.status(cid).state == self.pb.CONTAINER_RUNNING:
            assert (resp.exit_code, resp.stdout) == (3, b"out\n"), resp

    def op_stop_pod(self, kill: bool, pods: dict[str, Any]) -> None:
        if pods:
            pid = self.rng.choice(sorted(pods))
            for exp in self.model.expect.values():
                if exp.pod_id == pid:
                    exp.exit_code = None  # its running containers are killed by a signal
            self.call("runtime", "StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pid), kill)

    def op_remove_pod(self, kill: bool, pods: dict[str, Any]) -> None:
        if pods:
            pid = self.rng.choice(sorted(pods))
            self.call("runtime", "RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=pid), kill)

    def op_pull(self, kill: bool) -> None:
        self.call("images", "PullImage", self.pb.PullImageRequest(image=self.pb.ImageSpec(image=self.rt.image)), kill)

    def step(self, i: int) -> None:
        pods, ctrs = self.state()
        kill = self.rng.random() < KILL_P
        if kill and self.rng.random() < 0.3:
            self.crash(f"before op {i}")
            pods, ctrs = self.state()
            kill = False
        ready = sum(1 for x in pods.values() if x.state == self.pb.SANDBOX_READY)
        table: list[tuple[float, Callable[[], None]]] = [
            (3.0 if ready < MAX_PODS else 0.0, lambda: self.op_run_pod(kill)),
            (4.0, lambda: self.op_create(kill, pods)),
            (4.0, lambda: self.op_start(kill, ctrs)),
            (1.5, lambda: self.op_stop(kill, ctrs)),
            (1.5, lambda: self.op_remove(kill, ctrs)),
            (2.0, lambda: self.op_exec(kill, ctrs)),
            (0.8, lambda: self.op_stop_pod(kill, pods)),
            (1.0 if ready >= 2 else 0.2, lambda: self.op_remove_pod(kill, pods)),
            (0.5, lambda: self.op_pull(kill)),
        ]
        weights = [w for w, _ in table]
        op = self.rng.choices([f for _, f in table], weights=weights)[0]
        name = op.__code__.co_names[-1] if op.__code__.co_names else "?"
        self.log.append(f"{i}:{name}{'!' if kill else ''}")
        try:
            op()
        except grpc.RpcError as e:
            assert e.code() in ACCEPTABLE, f"op {i} {name}: {e.code()} {e.details()} (seed {SEED})"


def test_sigkill_during_random_operations(rt: Runtime) -> None:
    rng = random.Random(SEED)
    chaos = Chaos(rt, rng)
    for i in range(OPS):
        chaos.step(i)
        if i % 10 == 9:
            problems = chaos.checker.check(chaos.model.expect)
            assert not problems, f"after op {i} (seed {SEED}; {chaos.log}):\n" + explain(rt, problems)
    if chaos.kills == 0:
        chaos.crash("at the end")
    # Remove everything through CRI, then nothing this daemon ever made may remain.
    assert rt.proc.proc is not None
    pb = rt.pb
    for p in rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p.id))
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id))
    # fds: a fresh daemon with no pods versus this one after all the churn (minus what restarts reset).
    rt.proc.kill()
    rt.proc.start()
    baseline = fd_count(rt.proc.proc.pid)
    for n in range(3):
        pid, cfg = rt.run_pod(f"fdprobe{n}")
        cid = rt.create(pid, cfg, "x", ["sh", "-c", "exit 0"])
        rt.start(cid)
        rt.wait_state(cid, pb.CONTAINER_EXITED)
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pid))
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pid))
    problems = chaos.checker.check_empty(shimd_fds_baseline=baseline)
    assert not problems, f"seed {SEED}, {chaos.kills} kills, ops {chaos.log}:\n" + explain(rt, problems)


STOP_KILLS = int(os.environ.get("SHIMD_CHAOS_STOP_KILLS", "6"))


def test_sigkill_inside_the_concurrent_pod_start_and_stop(net_rt: NetRuntime) -> None:
    """RunPodSandbox runs CNI ADD while the shim is launched and the pause task made (these pods share
    one PID namespace: no linux options, pid=POD), StopPodSandbox stops the pod's tasks while its CNI
    DEL runs: SIGKILL lands inside those windows at random points (a real bridge network, a running
    container). After each restart every invariant holds, an interrupted start is undone, and the
    repeated Stop/Remove frees everything: IP lease, NAT rules, veth."""
    rt, net, pb = net_rt.rt, net_rt.net, net_rt.rt.pb
    rng = random.Random(SEED)
    checker = Checker(rt)
    ports = {ln.split(":")[1].strip() for ln in _bridge_links(net.bridge)}

    def kill_inside(call: Any, latest: float) -> None:
        """SIGKILL shimd at a random point of the call under way (up to `latest` s in), then restart it."""
        time.sleep(rng.uniform(0.0, latest))
        rt.proc.kill()
        with contextlib.suppress(grpc.RpcError, grpc.FutureTimeoutError):
            call.result(timeout=10)
        checker.note_disk()
        rt.proc.start(timeout=60)

    def clean(what: str) -> None:
        problems = checker.check()
        assert not problems, f"{what} (seed {SEED}):\n" + explain(rt, problems)
        assert net.allocations() == [], f"IP leases left {what}: {net.allocations()}"
        assert rules_of(net.name, nat_rules())[0] == [], f"NAT rules left {what}"
        left = {ln.split(":")[1].strip() for ln in _bridge_links(net.bridge)} - ports
        assert not left, f"bridge ports left {what}: {left}"

    for i in range(STOP_KILLS):
        kill_inside(rt.client.runtime.RunPodSandbox.future(
            pb.RunPodSandboxRequest(config=rt.pod_config(f"startkill{i}")), timeout=60), 0.1)
        for p in checker.listed()[0]:  # the start may have finished before the kill
            rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p))
            rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p))
        clean(f"after start kill {i}")

        pod_id, cfg = rt.run_pod(f"stopkill{i}")
        cid = rt.create(pod_id, cfg, "c", ["sleep", "1000"])
        rt.start(cid)
        kill_inside(rt.client.runtime.StopPodSandbox.future(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                                            timeout=60), 0.12)
        problems = checker.check({cid: Expect(pod_id, None)})
        assert not problems, f"kill {i} (seed {SEED}):\n" + explain(rt, problems)
        pods, _ = checker.listed()
        assert pod_id in pods, "a pod whose StopPodSandbox was cut short is still listed"
        # kubelet repeats the stop; then the pod and its network are gone for good.
        rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert st.state == pb.SANDBOX_NOTREADY
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        clean(f"after stop kill {i}")
    assert not (rt.proc.root / "network").exists() or not list((rt.proc.root / "network").glob("*.json"))


def _bridge_links(bridge: str) -> list[str]:
    return subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True,
                          timeout=10).stdout.splitlines()
