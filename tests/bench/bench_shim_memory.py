"""Memory of one shim holding one sleeping container: shimd's runc shims (the compiled one and the Python
one) vs containerd-shim-runc-v2.

Both are launched the same way (shimd's launcher) and driven with the same TaskClient; after the
container has run for a moment, RSS (VmRSS) and PSS/private memory (/proc/PID/smaps_rollup) of the
shim process are read. Everything is removed afterwards.

    .venv/bin/python -m tests.bench.bench_shim_memory [--settle 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

import betterproto.lib.google.protobuf as pb

from shimd.api.containerd import types as ctypes
from shimd.api.containerd.runc import v1 as runc_v1
from shimd.api.containerd.task import v2 as task
from shimd.runtimes.runc import find_native_shim
from shimd.shimmgr.launcher import start_shim
from shimd.shimmgr.task_client import TaskClient
from tests.support.shim_env import ShimEnv, busybox_rootfs


def memory_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Anonymous"):
                out[key] = int(line.split()[1])
    # Private_Dirty is what a shim costs however many run: its clean private pages are the binary's,
    # shared once a second shim maps them.
    out["Private"] = out.pop("Private_Clean", 0) + out["Private_Dirty"]
    return out


async def measure(env: ShimEnv, name: str, argv: list[str], settle: float) -> dict[str, int]:
    bundle = env.bundle(name, ["sleep", "100000"])
    # containerd's shim runs in the task bundle; shimd's in the pod bundle
    cwd = bundle if "containerd" in argv[0] else env.pod_bundle(name)
    address = await start_shim(argv, namespace="bench", pod_id=name, shimd_address=env.shimd_address, bundle=cwd,
                               env=env.env, timeout=30)
    c = await TaskClient.connect(address, timeout=10)
    shim_pid = 0
    try:
        shim_pid = (await c.connect(task.ConnectRequest(id=name), timeout=5)).shim_pid
        opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(root=str(env.runc_root))))
        log = env.base / f"{name}.log"
        await c.create(task.CreateTaskRequest(id=name, bundle=str(bundle),
                                              rootfs=[ctypes.Mount(**m) for m in env.overlay(name)],
                                              stdout=f"file://{log}", stderr=f"file://{log}", options=opts),
                       timeout=30)
        await c.start(task.StartRequest(id=name), timeout=30)
        await c.state(task.StateRequest(id=name), timeout=30)
        await asyncio.sleep(settle)
        mem = memory_kb(shim_pid)
        await c.kill(task.KillRequest(id=name, signal=signal.SIGKILL), timeout=30)
        await c.wait(task.WaitRequest(id=name), timeout=30)
        await c.delete(task.DeleteRequest(id=name), timeout=30)
        await c.shutdown(task.ShutdownRequest(id=name, now=True), timeout=10)
        return mem
    finally:
        await c.close()
        if shim_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(shim_pid, signal.SIGKILL)


def make_env() -> ShimEnv:
    base = Path(f"/tmp/sb-{uuid.uuid4().hex[:8]}")
    base.mkdir()
    return ShimEnv(base=base, rootfs=busybox_rootfs(base / "bb"), runc_root=base / "runc", shim_dir=base / "s",
                   cgroup_parent=f"/shimdbench-{base.name}", shimd_address=str(base / "shimd.sock"))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to let each shim settle before measuring")
    args = ap.parse_args()
    env = make_env()
    try:
        native_bin = find_native_shim()
        native = await measure(env, "native", [native_bin], args.settle) if native_bin else {}
        ours = await measure(env, "ours", [sys.executable, "-m", "shims.runc.shim"], args.settle)
        real_bin = shutil.which("containerd-shim-runc-v2")
        theirs = await measure(env, "containerd", [real_bin], args.settle) if real_bin else {}
    finally:
        env.cleanup()
    keys = ["VmRSS", "Pss", "Private", "Private_Dirty", "Anonymous", "Shared_Clean", "VmHWM", "Threads"]
    print(f"{'kB':<14}{'native shim':>14}{'Python shim':>14}{'containerd-shim-runc-v2':>26}")
    for k in keys:
        print(f"{k:<14}{native.get(k, 0):>14}{ours.get(k, 0):>14}{theirs.get(k, 0):>26}")


if __name__ == "__main__":
    asyncio.run(main())
