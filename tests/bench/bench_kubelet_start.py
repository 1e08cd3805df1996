"""Static pod start through a real kubelet: manifest written -> container running, shimd vs containerd 1.6.

Each runtime (shimd, a private containerd) has a standalone kubelet of its own (tests/support/kubelet.py),
both up at once; the same print-and-sleep static pods are written one at a time, alternating between the
two. The image is pulled before the first pod, so each time is kubelet's file source, its pod worker and
the runtime's sandbox, create and start calls. Times are read by polling the runtime's CRI ListContainers
every 10 ms.

    .venv/bin/python -m tests.bench.bench_kubelet_start --pods 5
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tests.bench.bench_pod_start import Containerd, Runtime, Shimd, bench_workspace, cni_conf
from tests.support import gotools
from tests.support.cri_client import CriClient
from tests.support.kubelet import (
    Kubelet,
    kubelet_iptables_chains,
    make_cgroup_root,
    remove_cgroup_root,
    remove_kubelet_iptables,
)


def _manifest(name: str, image: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "c", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "echo started; exec sleep 100000"]}]}}


def _running(client: CriClient, pod_name: str) -> bool:
    pb = client.pb
    flt = pb.ContainerFilter(label_selector={"io.kubernetes.pod.name": pod_name},
                             state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING))
    return bool(client.runtime.ListContainers(pb.ListContainersRequest(filter=flt)).containers)


def _remove_all(client: CriClient) -> None:
    pb = client.pb
    with contextlib.suppress(grpc.RpcError):
        for p in client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
            client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=p.id))
            client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id))


@dataclass
class Side:
    """One runtime with a kubelet of its own."""

    rt: Runtime
    client: CriClient
    kubelet: Kubelet
    cgroup_root: str
    times: list[float] = field(default_factory=list)


def start_side(rt: Runtime, image: str, work: Path, undo: contextlib.ExitStack) -> Side:
    cgroup_root = f"shimd-kubelet-bench-{random.getrandbits(24):06x}"
    client = rt.start()
    undo.callback(rt.stop)
    socket = rt.proc.socket if isinstance(rt, Shimd) else rt.peer.socket if isinstance(rt, Containerd) else ""
    kubelet = Kubelet(gotools.tool("kubelet"), work / f"kubelet-{rt.name}", socket, cgroup_root)
    undo.callback(remove_cgroup_root, cgroup_root)
    undo.callback(_remove_all, client)
    undo.callback(kubelet.stop)
    client.images.PullImage(client.pb.PullImageRequest(image=client.pb.ImageSpec(image=image)))
    make_cgroup_root(cgroup_root)
    kubelet.start()
    kubelet.wait_healthy()
    return Side(rt, client, kubelet, cgroup_root)


def one_pod(side: Side, name: str, image: str) -> None:
    side.kubelet.write_manifest(name, _manifest(name, image))
    t0 = time.monotonic()
    while not _running(side.client, f"{name}-{side.kubelet.node_name}"):
        if time.monotonic() > t0 + 60:
            raise TimeoutError(f"{side.rt.name}: {name} not running after 60 s\n{side.kubelet.log_tail()}")
        time.sleep(0.01)
    side.times.append(time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5)
    args = ap.parse_args()
    with bench_workspace("shimd-bench-kl-") as ws, contextlib.ExitStack() as undo:
        # Last out: the KUBE-* chains and rules the kubelets add to the host, as the kubelet scenario does.
        undo.callback(remove_kubelet_iptables, kubelet_iptables_chains())
        ws.net.write(cni_conf("bridge", ws.net))
        for name in ("shimd", "containerd"):
            (ws.work / name).mkdir()
        sides = [start_side(Shimd(ws.work / "shimd", ws.reg, ws.net.conf_dir), ws.image, ws.work, undo),
                 start_side(Containerd(ws.work / "containerd", ws.reg, ws.net.conf_dir, ws.pause), ws.image, ws.work,
                            undo)]
        for i in range(args.pods):
            # Alternating which goes first keeps the machine's drift out of the comparison.
            for side in sides if i % 2 == 0 else sides[::-1]:
                one_pod(side, f"bench-{i}", ws.image)
        print(f"kubelet static pod, manifest written -> container running ({args.pods} pods per runtime, "
              "one at a time, runtimes alternating):")
        for side in sides:
            print(f"  {side.rt.name:10s} median {statistics.median(side.times):.3f} s   "
                  + " ".join(f"{t:.3f}" for t in side.times))


if __name__ == "__main__":
    main()
