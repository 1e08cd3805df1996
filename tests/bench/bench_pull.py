"""Pull+unpack of a ~100 MB multi-layer image from a local registry: shimd vs containerd 1.6.

Both through the CRI ImageService with the same grpcio client, cold store each run (fresh root,
daemon restarted), N runs, medians. Also shimd's peak RSS (VmHWM) during its pulls.

    .venv/bin/python -m tests.bench.bench_pull [--runs 5] [--mb 100] [--layers 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench.containerd_peer import ContainerdPeer
from tests.support import images as img
from tests.support.cri_client import CriClient
from tests.support.daemon import ShimdProcess
from tests.support.registry import insecure_toml, start_registry


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def timed_pull(client: CriClient, ref: str) -> float:
    pb = client.pb
    start = time.perf_counter()
    client.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=600)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--layers", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    reg = start_registry(work / "registry")
    try:
        man = img.big_image(args.mb, args.layers)
        ref = reg.client().push_image("bench/big", "v1", man)
        print(f"image {ref}: {len(man.layers)} layers, {man.size / 1e6:.1f} MB compressed")

        shimd_times: list[float] = []
        shimd_rss: list[float] = []
        ctd_times: list[float] = []

        def run_shimd(run: int) -> None:
            base = work / f"shimd{run}"
            base.mkdir()
            proc = ShimdProcess(base, insecure_toml(reg))
            try:
                client = proc.start()
                t = timed_pull(client, ref)
                assert proc.proc is not None
                rss = vm_hwm_kb(proc.proc.pid) / 1024
            finally:
                proc.stop()
                shutil.rmtree(base, ignore_errors=True)
            shimd_times.append(t)
            shimd_rss.append(rss)
            print(f"  shimd      run {run}: {t:.3f} s, peak RSS {rss:.1f} MB")

        def run_containerd(run: int) -> None:
            peer = ContainerdPeer(work / f"ctd{run}", plain_http_registries=[reg.host])
            try:
                client = peer.start()
                t = timed_pull(client, ref)
            finally:
                peer.stop(wipe=True)
            ctd_times.append(t)
            print(f"  containerd run {run}: {t:.3f} s")

        for run in range(args.runs):
            # Alternate who goes first, so page-cache and writeback effects do not favour one side.
            order = (run_shimd, run_containerd) if run % 2 == 0 else (run_containerd, run_shimd)
            for fn in order:
                fn(run)

        ms, mc = statistics.median(shimd_times), statistics.median(ctd_times)
        print(f"median pull+unpack: shimd {ms:.3f} s, containerd {mc:.3f} s, ratio shimd/containerd {ms / mc:.2f}x")
        print(f"shimd peak RSS: max {max(shimd_rss):.1f} MB, median {statistics.median(shimd_rss):.1f} MB")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
