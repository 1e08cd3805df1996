"""Static pod start through a real kubelet: manifest written -> container running, shimd vs containerd 1.6.

The same standalone kubelet (tests/support/kubelet.py) runs the same print-and-sleep static pods, one
after the other, first on a shimd, then on a private containerd (never both at once); the image is pulled
before the first pod, so each time is kubelet's file source, its pod worker and the runtime's sandbox,
create and start calls. Times are read by polling the runtime's CRI ListContainers every 10 ms.

    .venv/bin/python -m tests.bench.bench_kubelet_start --pods 5
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from pathlib import Path

import grpc

from tests.bench.bench_pod_start import Containerd, Runtime, Shimd, bench_workspace, cni_conf
from tests.support import gotools
from tests.support.cri_client import CriClient
from tests.support.kubelet import Kubelet, make_cgroup_root, remove_cgroup_root


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


def measure(rt: Runtime, image: str, work: Path, pods: int) -> list[float]:
    cgroup_root = f"shimd-kubelet-bench-{random.getrandbits(24):06x}"
    client = rt.start()
    socket = rt.proc.socket if isinstance(rt, Shimd) else rt.peer.socket if isinstance(rt, Containerd) else ""
    kubelet = Kubelet(gotools.tool("kubelet"), work / f"kubelet-{rt.name}", socket, cgroup_root)
    times: list[float] = []
    try:
        client.images.PullImage(client.pb.PullImageRequest(image=client.pb.ImageSpec(image=image)))
        make_cgroup_root(cgroup_root)
        kubelet.start()
        kubelet.wait_healthy()
        for i in range(pods):
            name = f"bench-{i}"
            kubelet.write_manifest(name, _manifest(name, image))
            t0 = time.monotonic()
            deadline = t0 + 60
            while not _running(client, f"{name}-{kubelet.node_name}"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{rt.name}: {name} not running after 60 s\n{kubelet.log_tail()}")
                time.sleep(0.01)
            times.append(time.monotonic() - t0)
    finally:
        kubelet.stop()
        _remove_all(client)
        rt.stop()
        remove_cgroup_root(cgroup_root)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=5)
    args = ap.parse_args()
    with bench_workspace("shimd-bench-kl-") as ws:
        ws.net.write(cni_conf("bridge", ws.net))
        results = {}
        for name in ("shimd", "containerd"):
            (ws.work / name).mkdir()
            rt = (Shimd(ws.work / name, ws.reg, ws.net.conf_dir) if name == "shimd"
                  else Containerd(ws.work / name, ws.reg, ws.net.conf_dir, ws.pause))
            results[name] = measure(rt, ws.image, ws.work, args.pods)
        print(f"kubelet static pod, manifest written -> container running ({args.pods} pods, one at a time):")
        for name, times in results.items():
            print(f"  {name:10s} median {statistics.median(times):.3f} s   "
                  + " ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    main()
