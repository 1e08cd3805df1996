"""The runc shim end to end: launched like a shim v2 binary, driven over ttrpc by TaskClient,
running real runc containers on an overlay of a busybox tree. Every test runs against both shims: the
Python one (shims/runc) and the compiled one (shims/native), which must behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import betterproto.lib.google.protobuf as pb
import pytest
import pytest_asyncio

from shimd import errors
from shimd.api.containerd import types as ctypes
from shimd.api.containerd.runc import v1 as runc_v1
from shimd.api.containerd.task import v2 as task
from shimd.api.containerd.v1.types import Status
from shimd.runtimes.runc import find_native_shim
from shimd.shimmgr.launcher import start_shim
from shimd.shimmgr.task_client import TaskClient
from shimproto.messages import START_ON_CREATE_ANNOTATION
from shims.runc.mounts import is_mountpoint
from tests.support.procs import alive
from tests.support.shim_env import ShimEnv, process_spec

PYTHON_SHIM = [sys.executable, "-m", "shims.runc.shim"]
CRI_LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (F|P) (.*)$")
T = 30.0
REPO = Path(__file__).resolve().parents[2]


def options(env: ShimEnv) -> pb.Any:
    return pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(root=str(env.runc_root))))


async def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture(params=["python", "native"])
def shim_argv(request: pytest.FixtureRequest) -> list[str]:
    """The shim binary's argv (before its flags)."""
    if request.param == "python":
        return PYTHON_SHIM
    path = find_native_shim()
    assert path, "the native shim is not built: `make native` (needs cargo)"
    return [path]


class Shim:
    def __init__(self, env: ShimEnv, address: str, client: TaskClient, pid: int, argv: list[str]) -> None:
        self.env, self.address, self.c, self.pid, self.argv = env, address, client, pid, argv

    async def create(self, name: str, args: list[str], stdout: str = "", stderr: str = "", stdin: str = "",
                     terminal: bool = False) -> tuple[Path, int]:
        b = self.env.bundle(name, args, terminal=terminal)
        mounts = [ctypes.Mount(**m) for m in self.env.overlay(name)]
        resp = await self.c.create(task.CreateTaskRequest(id=name, bundle=str(b), rootfs=mounts, terminal=terminal,
                                                          stdin=stdin, stdout=stdout, stderr=stderr,
                                                          options=options(self.env)), timeout=T)
        return b, resp.pid


@pytest_asyncio.fixture(loop_scope="function")
async def shim(shim_env: ShimEnv, shim_argv: list[str]) -> AsyncIterator[Shim]:
    pod = shim_env.pod_bundle()
    address = await start_shim(shim_argv, namespace="shimdtest", pod_id="pod1", shimd_address=shim_env.shimd_address,
                               bundle=pod, env=shim_env.env, timeout=T)
    client = await TaskClient.connect(address, timeout=10)
    pid = (await client.connect(task.ConnectRequest(id="pod1"), timeout=5)).shim_pid
    s = Shim(shim_env, address, client, pid, shim_argv)
    try:
        yield s
    finally:
        if not s.c.closed:
            with contextlib.suppress(errors.ShimdError):
                await s.c.shutdown(task.ShutdownRequest(id="pod1", now=True), timeout=5)
        await s.c.close()
        if not await wait_gone(pid, 5):
            os.kill(pid, signal.SIGKILL)


def path_exists(path: str) -> bool:
    return os.path.exists(path)


def read_lines(path: Path) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


async def wait_for_lines(path: Path, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if len(read_cri(path)) >= n:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not get {n} log lines within {timeout}s")


def file_size(path: Path) -> int:
    return os.stat(path).st_size


def read_cri(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for line in path.read_bytes().splitlines():
        mt = CRI_LINE.match(line)
        assert mt, f"not a CRI log line: {line!r}"
        out.append((mt.group(1), mt.group(2), mt.group(3)))
    return out


async def test_create_start_logs_exit_code_and_delete(shim: Shim) -> None:
    log = shim.env.base / "c1.log"
    long = "x" * 20000
    # SigIgn: the container must not inherit the shim's ignored SIGPIPE
    script = f"echo out1; echo err1 >&2; grep SigIgn /proc/self/status; echo {long}; printf tail; exit 3"
    bundle, pid = await shim.create("c1", ["sh", "-c", script], f"crilog://{log}", f"crilog://{log}")
    assert pid > 0 and is_mountpoint(str(bundle / "rootfs"))
    assert json.loads((bundle / "options.json").read_text())["root"] == str(shim.env.runc_root)
    st = await shim.c.state(task.StateRequest(id="c1"), timeout=T)
    assert st.status == Status.CREATED and st.pid == pid
    assert (await shim.c.start(task.StartRequest(id="c1"), timeout=T)).pid == pid
    # several concurrent waiters all see the exit
    waits = await asyncio.gather(*(shim.c.wait(task.WaitRequest(id="c1"), timeout=T) for _ in range(3)))
    assert {w.exit_status for w in waits} == {3}
    st = await shim.c.state(task.StateRequest(id="c1"), timeout=T)
    assert st.status == Status.STOPPED and st.exit_status == 3 and st.exited_at.year >= 2024
    lines = read_cri(log)
    assert (b"stdout", b"F", b"out1") in lines and (b"stderr", b"F", b"err1") in lines
    sig_ign = int(next(c for _, _, c in lines if c.startswith(b"SigIgn:")).split()[1], 16)
    assert not sig_ign & (1 << (signal.SIGPIPE - 1))
    parts = [ln for ln in lines if ln[0] == b"stdout" and ln[2].startswith(b"xxx")]
    assert [p[1] for p in parts] == [b"P", b"F"] and b"".join(p[2] for p in parts) == long.encode()
    assert len(parts[0][2]) == 16384
    assert lines[-1] == (b"stdout", b"F", b"tail")
    assert shim.env.cgroup_exists("c1")
    resp = await shim.c.delete(task.DeleteRequest(id="c1"), timeout=T)
    assert resp.exit_status == 3 and resp.pid == pid
    assert not is_mountpoint(str(bundle / "rootfs"))
    assert not shim.env.cgroup_exists("c1")
    assert "c1" not in shim.env.runc_containers()
    with pytest.raises(errors.NotFound):
        await shim.c.state(task.StateRequest(id="c1"), timeout=T)


async def test_kill_sleep_and_state_errors(shim: Shim) -> None:
    bundle, _ = await shim.create("k1", ["sleep", "1000"])
    with pytest.raises(errors.AlreadyExists):
        await shim.c.create(task.CreateTaskRequest(id="k1", bundle=str(bundle), options=options(shim.env)), timeout=T)
    await shim.c.start(task.StartRequest(id="k1"), timeout=T)
    with pytest.raises(errors.FailedPrecondition):
        await shim.c.start(task.StartRequest(id="k1"), timeout=T)
    with pytest.raises(errors.FailedPrecondition):
        await shim.c.delete(task.DeleteRequest(id="k1"), timeout=T)
    assert (await shim.c.state(task.StateRequest(id="k1"), timeout=T)).status == Status.RUNNING
    pids = await shim.c.pids(task.PidsRequest(id="k1"), timeout=T)
    assert len(pids.processes) == 1
    await shim.c.update(task.UpdateTaskRequest(id="k1", resources=pb.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
        value=json.dumps({"pids": {"limit": 50}}).encode())), timeout=T)
    await shim.c.kill(task.KillRequest(id="k1", signal=signal.SIGKILL), timeout=T)
    w = await shim.c.wait(task.WaitRequest(id="k1"), timeout=T)
    assert w.exit_status == 128 + signal.SIGKILL
    with pytest.raises(errors.NotFound):
        await shim.c.kill(task.KillRequest(id="k1", signal=signal.SIGTERM), timeout=T)
    for call in (shim.c.state(task.StateRequest(id="nope"), timeout=T),
                 shim.c.kill(task.KillRequest(id="nope", signal=9), timeout=T),
                 shim.c.wait(task.WaitRequest(id="k1", exec_id="nope"), timeout=T)):
        with pytest.raises(errors.NotFound):
            await call
    assert (await shim.c.delete(task.DeleteRequest(id="k1"), timeout=T)).exit_status == 137
    assert not shim.env.cgroup_exists("k1")


async def test_exec_with_fifos(shim: Shim) -> None:
    base = shim.env.base
    await shim.create("e1", ["sleep", "1000"])
    await shim.c.start(task.StartRequest(id="e1"), timeout=T)
    fifos = [base / f"exec.{n}" for n in ("in", "out", "err")]
    for f in fifos:
        os.mkfifo(f)
    # shimd's side of the FIFOs: readers for output, a writer for input
    out_fd = os.open(fifos[1], os.O_RDONLY | os.O_NONBLOCK)
    err_fd = os.open(fifos[2], os.O_RDONLY | os.O_NONBLOCK)
    spec = process_spec(["sh", "-c", "read x; echo got $x; echo oops >&2; exit 5"])
    await shim.c.exec(task.ExecProcessRequest(
        id="e1", exec_id="x1", stdin=str(fifos[0]), stdout=str(fifos[1]), stderr=str(fifos[2]),
        spec=pb.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                    value=json.dumps(spec).encode())), timeout=T)
    with pytest.raises(errors.AlreadyExists):
        await shim.c.exec(task.ExecProcessRequest(id="e1", exec_id="x1", spec=pb.Any(type_url="t", value=b"{}")),
                          timeout=T)
    xpid = (await shim.c.start(task.StartRequest(id="e1", exec_id="x1"), timeout=T)).pid
    assert xpid > 0
    pids = await shim.c.pids(task.PidsRequest(id="e1"), timeout=T)
    assert xpid in [p.pid for p in pids.processes]
    in_fd = os.open(fifos[0], os.O_WRONLY)
    os.write(in_fd, b"hello\n")
    os.close(in_fd)
    w = await shim.c.wait(task.WaitRequest(id="e1", exec_id="x1"), timeout=T)
    assert w.exit_status == 5
    st = await shim.c.state(task.StateRequest(id="e1", exec_id="x1"), timeout=T)
    assert st.status == Status.STOPPED and st.exec_id == "x1"

    def drain(fd: int) -> bytes:
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 4096):
                data += chunk
        os.close(fd)
        return data

    assert drain(out_fd) == b"got hello\n"
    assert drain(err_fd) == b"oops\n"
    assert (await shim.c.delete(task.DeleteRequest(id="e1", exec_id="x1"), timeout=T)).exit_status == 5
    with pytest.raises(errors.NotFound):
        await shim.c.state(task.StateRequest(id="e1", exec_id="x1"), timeout=T)
    await shim.c.kill(task.KillRequest(id="e1", signal=9, all=True), timeout=T)
    await shim.c.wait(task.WaitRequest(id="e1"), timeout=T)
    await shim.c.delete(task.DeleteRequest(id="e1"), timeout=T)


async def test_terminal_and_resize(shim: Shim) -> None:
    log = shim.env.base / "t1.log"
    await shim.create("t1", ["sh", "-c", "sleep 0.3; [ -t 1 ] && echo is-a-tty; stty size; exit 0"],
                      f"crilog://{log}", f"crilog://{log}", terminal=True)
    await shim.c.resize_pty(task.ResizePtyRequest(id="t1", width=100, height=40), timeout=T)
    await shim.c.start(task.StartRequest(id="t1"), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="t1"), timeout=T)).exit_status == 0
    lines = read_cri(log)
    assert all(s == b"stdout" for s, _, _ in lines)
    text = [c.rstrip(b"\r") for _, _, c in lines]
    assert b"is-a-tty" in text and b"40 100" in text
    await shim.c.delete(task.DeleteRequest(id="t1"), timeout=T)


LAUNCHER = """
import asyncio, sys, json
import betterproto.lib.google.protobuf as pb
from shimd.api.containerd import types as ctypes
from shimd.api.containerd.runc import v1 as runc_v1
from shimd.api.containerd.task import v2 as task
from shimd.shimmgr.launcher import start_shim
from shimd.shimmgr.task_client import TaskClient

async def main(a):
    addr = await start_shim(a["shim"], namespace="shimdtest", pod_id="pod2", shimd_address=a["shimd"],
                            bundle=__import__("pathlib").Path(a["pod"]), env=a["env"], timeout=30)
    c = await TaskClient.connect(addr, timeout=10)
    opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(root=a["root"])))
    await c.create(task.CreateTaskRequest(id="l1", bundle=a["bundle"], rootfs=[ctypes.Mount(**m) for m in a["mounts"]],
                   stdout="crilog://" + a["log"], stderr="crilog://" + a["log"], options=opts), timeout=30)
    await c.start(task.StartRequest(id="l1"), timeout=30)
    print(addr, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(json.loads(sys.argv[1])))
"""


async def test_shim_outlives_its_launcher_reconnect_reopen_and_shutdown(shim_env: ShimEnv,
                                                                          shim_argv: list[str]) -> None:
    env = shim_env
    pod = env.pod_bundle("pod2")
    log = env.base / "l1.log"
    bundle = env.bundle("l1", ["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"])
    args = {"shim": shim_argv, "shimd": env.shimd_address, "pod": str(pod), "env": env.env, "root": str(env.runc_root),
            "bundle": str(bundle), "mounts": env.overlay("l1"), "log": str(log)}
    launcher = await asyncio.create_subprocess_exec(sys.executable, "-c", LAUNCHER, json.dumps(args), cwd=REPO,
                                                    stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(T):
            address = (await launcher.stdout.readline()).decode().strip()  # type: ignore[union-attr]
    finally:
        # the process that launched the shim and created the container dies abruptly
        launcher.kill()
        await launcher.wait()
    assert address
    await wait_for_lines(log, 1)
    size1 = file_size(log)
    await asyncio.sleep(0.5)
    assert file_size(log) > size1, "the shim keeps writing logs with its launcher gone"

    c = await TaskClient.connect(address, timeout=10)
    try:
        info = await c.connect(task.ConnectRequest(id="l1"), timeout=5)
        assert alive(info.shim_pid) and info.task_pid > 0
        st = await c.state(task.StateRequest(id="l1"), timeout=T)
        assert st.status == Status.RUNNING
        # kubelet-style rotation: rename, then ask the shim to reopen
        rotated = env.base / "l1.log.1"
        os.rename(log, rotated)
        await c.reopen_log("l1", timeout=T)
        await wait_for_lines(log, 2)  # a new file is written after Reopen
        assert read_cri(rotated)
        with pytest.raises(errors.NotFound):
            await c.reopen_log("missing", timeout=T)
        # a second `start` finds the running shim instead of starting another
        again = await start_shim(shim_argv, namespace="shimdtest", pod_id="pod2", shimd_address=env.shimd_address,
                                 bundle=pod, env=env.env, timeout=T)
        assert again == address
        # Shutdown without now keeps a shim that still has containers
        await c.shutdown(task.ShutdownRequest(id="pod2"), timeout=5)
        assert alive(info.shim_pid)
        # (sh as pid 1 of its namespace ignores SIGTERM)
        await c.kill(task.KillRequest(id="l1", signal=signal.SIGKILL), timeout=T)
        assert (await c.wait(task.WaitRequest(id="l1"), timeout=T)).exit_status == 128 + signal.SIGKILL
        await c.delete(task.DeleteRequest(id="l1"), timeout=T)
        await c.shutdown(task.ShutdownRequest(id="pod2"), timeout=5)
        assert await wait_gone(info.shim_pid), "Shutdown ends the shim"
    finally:
        await c.close()
    assert not path_exists(address)
    assert not env.cgroup_exists("l1") and not env.runc_containers()
    assert not is_mountpoint(str(bundle / "rootfs"))
    records = [json.loads(line) for line in read_lines(pod / "shim.log")]
    assert any(r["event"] == "created" and r.get("container_id") == "l1" and r["pod_id"] == "pod2" for r in records)


async def test_driver_cleanup_after_dead_shim(shim: Shim) -> None:
    from shimd.config import HandlerConfig
    from shimd.runtimes.runc import RuncRuntime

    bundle, _ = await shim.create("d1", ["sleep", "1000"])
    await shim.c.start(task.StartRequest(id="d1"), timeout=T)
    os.kill(shim.pid, signal.SIGKILL)
    assert await wait_gone(shim.pid)
    with pytest.raises(errors.Unavailable):
        await shim.c.state(task.StateRequest(id="d1"), timeout=5)
    drv = RuncRuntime(HandlerConfig(name="runc", binary="runc", root=str(shim.env.runc_root)), shim.env.base)
    assert drv.available()[0]
    await drv.cleanup_after_dead_shim(["d1"], [bundle])
    assert "d1" not in shim.env.runc_containers()
    assert not is_mountpoint(str(bundle / "rootfs"))
    assert not shim.env.cgroup_exists("d1")


async def test_closeio_ends_stdin_and_created_task_can_be_deleted(shim: Shim) -> None:
    base = shim.env.base
    fin, fout = base / "cat.in", base / "cat.out"
    os.mkfifo(fin)
    keep_writer = os.open(fin, os.O_RDWR)  # shimd's side stays open: only CloseIO can end stdin
    try:
        await shim.create("io1", ["sh", "-c", "cat; echo eof-seen"], stdin=str(fin), stdout=f"file://{fout}")
        await shim.c.start(task.StartRequest(id="io1"), timeout=T)
        os.write(keep_writer, b"abc\n")
        await asyncio.sleep(0.3)
        assert (await shim.c.state(task.StateRequest(id="io1"), timeout=T)).status == Status.RUNNING
        await shim.c.close_io(task.CloseIoRequest(id="io1", stdin=True), timeout=T)
        assert (await shim.c.wait(task.WaitRequest(id="io1"), timeout=T)).exit_status == 0
        assert read_lines(fout) == ["abc", "eof-seen"]
    finally:
        os.close(keep_writer)
    await shim.c.delete(task.DeleteRequest(id="io1"), timeout=T)
    # a task that was created but never started is deleted (runc kills its init)
    bundle, pid = await shim.create("cr1", ["sleep", "1000"])
    resp = await shim.c.delete(task.DeleteRequest(id="cr1"), timeout=T)
    assert resp.pid == pid and not alive(pid)
    assert not is_mountpoint(str(bundle / "rootfs")) and not shim.env.cgroup_exists("cr1")


async def test_shim_delete_command_cleans_up_after_a_dead_shim(shim: Shim) -> None:
    from shimd.shimmgr.launcher import delete_shim

    bundle, _ = await shim.create("dd1", ["sleep", "1000"])
    await shim.c.start(task.StartRequest(id="dd1"), timeout=T)
    os.kill(shim.pid, signal.SIGKILL)
    assert await wait_gone(shim.pid)
    resp = await delete_shim(shim.argv, namespace="shimdtest", task_id="dd1", shimd_address=shim.env.shimd_address,
                             bundle=bundle, env=shim.env.env, timeout=T)
    assert resp.exit_status == 137
    assert "dd1" not in shim.env.runc_containers()
    assert not is_mountpoint(str(bundle / "rootfs")) and not shim.env.cgroup_exists("dd1")


async def test_exec_with_terminal(shim: Shim) -> None:
    base = shim.env.base
    await shim.create("tt1", ["sleep", "1000"])
    await shim.c.start(task.StartRequest(id="tt1"), timeout=T)
    fin, fout = base / "tty.in", base / "tty.out"
    os.mkfifo(fin)
    os.mkfifo(fout)
    out_fd = os.open(fout, os.O_RDONLY | os.O_NONBLOCK)
    spec = process_spec(["sh"], terminal=True)
    with pytest.raises(errors.InvalidArgument):
        await shim.c.exec(task.ExecProcessRequest(id="tt1", exec_id="../x", spec=pb.Any(type_url="t", value=b"{}")),
                          timeout=T)
    await shim.c.exec(task.ExecProcessRequest(
        id="tt1", exec_id="tty", terminal=True, stdin=str(fin), stdout=str(fout),
        spec=pb.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                    value=json.dumps(spec).encode())), timeout=T)
    await shim.c.start(task.StartRequest(id="tt1", exec_id="tty"), timeout=T)
    await shim.c.resize_pty(task.ResizePtyRequest(id="tt1", exec_id="tty", width=123, height=45), timeout=T)
    in_fd = os.open(fin, os.O_WRONLY)
    os.write(in_fd, b"stty size; exit 4\n")
    assert (await shim.c.wait(task.WaitRequest(id="tt1", exec_id="tty"), timeout=T)).exit_status == 4
    os.close(in_fd)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(out_fd, 4096):
            data += chunk
    os.close(out_fd)
    assert b"45 123" in data
    await shim.c.delete(task.DeleteRequest(id="tt1", exec_id="tty"), timeout=T)
    await shim.c.kill(task.KillRequest(id="tt1", signal=9), timeout=T)
    await shim.c.wait(task.WaitRequest(id="tt1"), timeout=T)
    await shim.c.delete(task.DeleteRequest(id="tt1"), timeout=T)


def runc_status(env: ShimEnv, cid: str) -> str:
    out = subprocess.run(["runc", "--root", str(env.runc_root), "state", cid], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return str(json.loads(out)["status"])


async def test_a_task_whose_spec_asks_for_it_runs_on_create_and_start_only_answers(shim: Shim) -> None:
    # shimd's pause tasks and containers carry the annotation: one runc process makes them running.
    b = shim.env.bundle("sc1", ["sleep", "1000"])
    spec = json.loads((b / "config.json").read_text())
    spec["annotations"] = {START_ON_CREATE_ANNOTATION: "true"}
    (b / "config.json").write_text(json.dumps(spec))
    pid = (await shim.c.create(task.CreateTaskRequest(
        id="sc1", bundle=str(b), rootfs=[ctypes.Mount(**m) for m in shim.env.overlay("sc1")],
        options=options(shim.env)), timeout=T)).pid
    assert pid > 0 and alive(pid)
    assert runc_status(shim.env, "sc1") == "running"
    assert (await shim.c.state(task.StateRequest(id="sc1"), timeout=T)).status == Status.RUNNING
    assert (await shim.c.start(task.StartRequest(id="sc1"), timeout=T)).pid == pid
    with pytest.raises(errors.FailedPrecondition):
        await shim.c.start(task.StartRequest(id="sc1"), timeout=T)
    await shim.c.kill(task.KillRequest(id="sc1", signal=signal.SIGKILL, all=True), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="sc1"), timeout=T)).exit_status == 128 + signal.SIGKILL
    await shim.c.delete(task.DeleteRequest(id="sc1"), timeout=T)
    assert "sc1" not in shim.env.runc_containers()


async def test_sigkill_to_all_of_a_container_with_its_own_pid_namespace_kills_every_process(shim: Shim) -> None:
    # The shim signals the init itself (no runc kill --all): the kernel ends the whole PID namespace.
    await shim.create("ka", ["sh", "-c", "sleep 1001 & sleep 1002 & wait"])
    await shim.c.start(task.StartRequest(id="ka"), timeout=T)
    await shim.c.exec(task.ExecProcessRequest(id="ka", exec_id="x1", spec=pb.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
        value=json.dumps(process_spec(["sleep", "1003"])).encode())), timeout=T)
    await shim.c.start(task.StartRequest(id="ka", exec_id="x1"), timeout=T)
    deadline = time.monotonic() + 10
    while len((await shim.c.pids(task.PidsRequest(id="ka"), timeout=T)).processes) < 4:
        assert time.monotonic() < deadline, "the container's processes did not all start"
        await asyncio.sleep(0.05)
    host_pids = [p.pid for p in (await shim.c.pids(task.PidsRequest(id="ka"), timeout=T)).processes]
    await shim.c.kill(task.KillRequest(id="ka", signal=signal.SIGKILL, all=True), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="ka"), timeout=T)).exit_status == 128 + signal.SIGKILL
    assert (await shim.c.wait(task.WaitRequest(id="ka", exec_id="x1"), timeout=T)).exit_status == \
        128 + signal.SIGKILL
    for p in host_pids:
        assert await wait_gone(p), f"process {p} of the container outlived its SIGKILL"
    await shim.c.delete(task.DeleteRequest(id="ka", exec_id="x1"), timeout=T)
    await shim.c.delete(task.DeleteRequest(id="ka"), timeout=T)


async def test_pause_task_the_shim_forks_fails_its_create_cleanly_and_is_deleted_with_its_cgroups(
        shim: Shim) -> None:
    """A pause spec as shimd writes it is started without runc (shims/runc/pause.py): a rootfs without its
    binary fails Create with the reason and leaves no process or cgroup; a good one runs as PID 1 of its own
    PID namespace until killed, and Delete removes its cgroups."""
    from shimd.oci import spec as ocispec

    def pause_bundle(name: str, with_binary: bool) -> Path:
        b = shim.env.base / "pause" / name
        (b / "rootfs").mkdir(parents=True)
        if with_binary:
            shutil.copy2("/usr/bin/catatonit", b / "rootfs" / "pause")
        ctx = ocispec.PodContext(pod_id=name, name=name, namespace="default", uid=name, hostname=name, namespaces={},
                                 cgroups_path=f"{shim.env.cgroup_parent}/{name}")
        (b / "config.json").write_text(json.dumps(ocispec.pause_spec(ctx, str(b / "rootfs"), ["/pause", "-P"])))
        return b

    bad = pause_bundle("nobinary", with_binary=False)
    with pytest.raises(errors.ShimdError, match="/pause is not an executable file"):
        await shim.c.create(task.CreateTaskRequest(id="nobinary", bundle=str(bad), options=options(shim.env)),
                            timeout=T)
    assert not shim.env.cgroup_exists("nobinary")
    with pytest.raises(errors.NotFound):
        await shim.c.state(task.StateRequest(id="nobinary"), timeout=T)

    good = pause_bundle("pause1", with_binary=True)
    pid = (await shim.c.create(task.CreateTaskRequest(id="pause1", bundle=str(good), options=options(shim.env)),
                               timeout=T)).pid
    assert "pause1" not in shim.env.runc_containers()  # not runc's
    assert not (good / "options.json").exists()  # nothing of runc's for `shim delete` to clean after a crash
    status = await asyncio.to_thread(Path(f"/proc/{pid}/status").read_text)
    assert re.search(r"^NSpid:\s+\d+\s+1$", status, re.M), status
    assert re.search(rf"^PPid:\s+{shim.pid}$", status, re.M), status
    deadline = time.monotonic() + 10
    while not shim.env.cgroup_exists("pause1") or \
            f":memory:{shim.env.cgroup_parent}/pause1" not in await asyncio.to_thread(
                Path(f"/proc/{pid}/cgroup").read_text):
        assert time.monotonic() < deadline, "the pause task did not join its cgroup"
        await asyncio.sleep(0.02)
    await shim.c.kill(task.KillRequest(id="pause1", signal=signal.SIGKILL, all=True), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="pause1"), timeout=T)).exit_status == 128 + signal.SIGKILL
    await shim.c.delete(task.DeleteRequest(id="pause1"), timeout=T)
    assert not shim.env.cgroup_exists("pause1")


def runc_wrapper(env: ShimEnv) -> tuple[Path, Path]:
    """A `runc` that notes each command line before running the real one: which deletes runc did."""
    d = env.base / "wrapped"
    d.mkdir(exist_ok=True)
    calls = d / "calls"
    wrapper = d / "runc"
    real = shutil.which("runc")
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, calls


async def create_started(shim: Shim, opts: pb.Any, name: str, args: list[str], pid_ns: str = "") -> int:
    """A started task through the shim with these runc options; pid_ns: a PID namespace it joins."""
    b = shim.env.bundle(name, args)
    if pid_ns:
        spec = json.loads((b / "config.json").read_text())
        spec["linux"]["namespaces"] = [{"type": "pid", "path": pid_ns} if n["type"] == "pid" else n
                                       for n in spec["linux"]["namespaces"]]
        (b / "config.json").write_text(json.dumps(spec))
    pid = (await shim.c.create(task.CreateTaskRequest(
        id=name, bundle=str(b), options=opts, rootfs=[ctypes.Mount(**m) for m in shim.env.overlay(name)]),
        timeout=T)).pid
    await shim.c.start(task.StartRequest(id=name), timeout=T)
    return pid


async def test_a_reaped_container_is_deleted_without_runc_and_leaves_what_runc_delete_leaves(shim: Shim) -> None:
    """Delete of a container whose init the shim reaped removes its cgroups (sub-cgroups too) and runc's
    state itself (shims/runc/reaped_delete.py); a spec with a poststop hook goes to `runc delete`, the
    reference, and both leave the same: no cgroup in any hierarchy, no state, unknown to runc."""
    wrapper, calls = runc_wrapper(shim.env)
    opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(
        root=str(shim.env.runc_root), binary_name=str(wrapper))))
    hook_out = shim.env.base / "poststop-ran"

    async def run_and_kill(name: str, poststop: bool) -> None:
        b = shim.env.bundle(name, ["sleep", "1000"])
        if poststop:
            spec = json.loads((b / "config.json").read_text())
            spec["hooks"] = {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", f"echo {name} >> {hook_out}"]}]}
            (b / "config.json").write_text(json.dumps(spec))
        await shim.c.create(task.CreateTaskRequest(id=name, bundle=str(b), options=opts,
                                                   rootfs=[ctypes.Mount(**m) for m in shim.env.overlay(name)]),
                            timeout=T)
        await shim.c.start(task.StartRequest(id=name), timeout=T)
        assert shim.env.cgroup_exists(name) and name in shim.env.runc_containers()
        await shim.c.kill(task.KillRequest(id=name, signal=signal.SIGKILL), timeout=T)
        assert (await shim.c.wait(task.WaitRequest(id=name), timeout=T)).exit_status == 128 + signal.SIGKILL

    await run_and_kill("reaped", poststop=False)
    # A sub-cgroup (as a container running its own cgroup manager makes): runc removes it, so must this.
    subs = [d / "inner" for d in shim.env.cgroup_dirs("reaped")]
    for s in subs:
        s.mkdir()
    await run_and_kill("hooked", poststop=True)
    for name in ("reaped", "hooked"):
        resp = await shim.c.delete(task.DeleteRequest(id=name), timeout=T)
        assert resp.exit_status == 128 + signal.SIGKILL
        assert not shim.env.cgroup_exists(name), f"{name}: a cgroup is left"
        assert name not in shim.env.runc_containers() and not (shim.env.runc_root / name).exists()
    assert subs and not any(s.exists() for s in subs)
    deletes = [line for line in calls.read_text().splitlines() if " delete " in f" {line} "]
    assert not any(line.endswith(" reaped") for line in deletes), deletes
    assert any(line.endswith(" hooked") for line in deletes), deletes
    assert hook_out.read_text().split() == ["hooked"]


async def test_a_reaped_container_whose_cgroup_stays_busy_is_left_to_runc_delete(shim: Shim) -> None:
    """A process that is not the container's (moved into its cgroups from outside) keeps them busy: the shim
    gives up after its retries and runs `runc delete --force`, which then does what it always did with such
    a container (runc 1.1 forgets it and leaves the busy cgroups and the stranger alone)."""
    wrapper, calls = runc_wrapper(shim.env)
    opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(
        root=str(shim.env.runc_root), binary_name=str(wrapper))))
    b = shim.env.bundle("busy", ["sleep", "1000"])
    await shim.c.create(task.CreateTaskRequest(id="busy", bundle=str(b), options=opts,
                                               rootfs=[ctypes.Mount(**m) for m in shim.env.overlay("busy")]),
                        timeout=T)
    await shim.c.start(task.StartRequest(id="busy"), timeout=T)
    stranger = await asyncio.create_subprocess_exec("sleep", "300")
    dirs = shim.env.cgroup_dirs("busy")
    try:
        for d in dirs:
            (d / "cgroup.procs").write_text(str(stranger.pid))
        await shim.c.kill(task.KillRequest(id="busy", signal=signal.SIGKILL), timeout=T)
        await shim.c.wait(task.WaitRequest(id="busy"), timeout=T)
        await shim.c.delete(task.DeleteRequest(id="busy"), timeout=T)
        assert any(line.endswith("delete --force busy") for line in calls.read_text().splitlines())
        assert "busy" not in shim.env.runc_containers()
        assert stranger.returncode is None and shim.env.cgroup_exists("busy")
    finally:
        if stranger.returncode is None:
            stranger.kill()
            await stranger.wait()
        for d in dirs:
            deadline = time.monotonic() + 10
            while d.exists():
                with contextlib.suppress(OSError):
                    d.rmdir()
                assert time.monotonic() < deadline, f"{d} stayed busy"
                await asyncio.sleep(0.02)


async def test_a_reaped_container_sharing_a_pid_namespace_is_deleted_without_runc_unless_it_left_processes(
        shim: Shim) -> None:
    """Without a PID namespace of its own a container's orphans outlive its init (the namespace's init
    inherits them): with none left the shim deletes it itself; with one left, `runc delete --force` kills
    it, as runc does for such containers, and removes the cgroups."""
    wrapper, calls = runc_wrapper(shim.env)
    opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(
        root=str(shim.env.runc_root), binary_name=str(wrapper))))

    async def create(name: str, args: list[str], pid_ns: str = "") -> int:
        return await create_started(shim, opts, name, args, pid_ns)

    holder = await create("holder", ["sleep", "1000"])
    ns = f"/proc/{holder}/ns/pid"
    await create("lone", ["sh", "-c", "exit 0"], ns)
    await create("orphaner", ["sh", "-c", "sleep 1001 & echo started; exit 0"], ns)
    for name in ("lone", "orphaner"):
        assert (await shim.c.wait(task.WaitRequest(id=name), timeout=T)).exit_status == 0
    orphans = [int(p) for d in shim.env.cgroup_dirs("orphaner") if (d / "cgroup.procs").exists()
               for p in (d / "cgroup.procs").read_text().split()]
    assert orphans and all(alive(p) for p in orphans)
    for name in ("lone", "orphaner"):
        await shim.c.delete(task.DeleteRequest(id=name), timeout=T)
        assert not shim.env.cgroup_exists(name) and name not in shim.env.runc_containers()
    for p in set(orphans):
        assert await wait_gone(p), f"the orphan {p} outlived runc delete --force"
    deletes = [line for line in calls.read_text().splitlines() if " delete " in f" {line} "]
    assert not any(line.endswith(" lone") for line in deletes), deletes
    assert any(line.endswith("delete --force orphaner") for line in deletes), deletes
    await shim.c.kill(task.KillRequest(id="holder", signal=signal.SIGKILL), timeout=T)
    await shim.c.wait(task.WaitRequest(id="holder"), timeout=T)
    await shim.c.delete(task.DeleteRequest(id="holder"), timeout=T)


async def test_sigkill_to_all_of_a_container_sharing_a_pid_namespace_is_sent_without_runc_unless_paused(
        shim: Shim) -> None:
    """Without a PID namespace of its own, every process of the container's cgroup must be signalled
    (cgroup_kill.py): the shim freezes the cgroup, signals each and thaws, and runc is not run; every
    process dies, the exec'd one and one in a sub-cgroup included. A paused container is left to runc."""
    wrapper, calls = runc_wrapper(shim.env)
    opts = pb.Any(type_url="containerd.runc.v1.Options", value=bytes(runc_v1.Options(
        root=str(shim.env.runc_root), binary_name=str(wrapper))))

    async def create(name: str, args: list[str], pid_ns: str = "") -> int:
        return await create_started(shim, opts, name, args, pid_ns)

    async def processes(name: str, count: int) -> list[int]:
        deadline = time.monotonic() + 10
        while True:
            pids = [p.pid for p in (await shim.c.pids(task.PidsRequest(id=name), timeout=T)).processes]
            if len(pids) >= count:
                return pids
            assert time.monotonic() < deadline, f"{name}: {pids}, not {count} processes"
            await asyncio.sleep(0.05)

    holder = await create("holder2", ["sleep", "1000"])
    ns = f"/proc/{holder}/ns/pid"
    for name in ("shared", "frozen"):
        await create(name, ["sh", "-c", "sleep 1001 & sleep 1002 & wait"], ns)
    await shim.c.exec(task.ExecProcessRequest(id="shared", exec_id="x1", spec=pb.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
        value=json.dumps(process_spec(["sleep", "1003"])).encode())), timeout=T)
    await shim.c.start(task.StartRequest(id="shared", exec_id="x1"), timeout=T)
    pids = await processes("shared", 4)
    # One of them in a sub-cgroup of the container's (as a container may make for itself).
    sub_pid = pids[-1]
    for d in shim.env.cgroup_dirs("shared"):
        if (d / "cgroup.procs").exists() and "freezer" in str(d):
            (d / "sub").mkdir()
            (d / "sub" / "cgroup.procs").write_text(str(sub_pid))
    await shim.c.kill(task.KillRequest(id="shared", signal=signal.SIGKILL, all=True), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="shared"), timeout=T)).exit_status == 128 + signal.SIGKILL
    for p in pids:
        assert await wait_gone(p), f"process {p} of the container outlived its SIGKILL"
    assert holder and alive(holder), "the PID namespace's own init was signalled too"

    await shim.c.pause(task.PauseRequest(id="frozen"), timeout=T)
    frozen_pids = await processes("frozen", 3)
    await shim.c.kill(task.KillRequest(id="frozen", signal=signal.SIGKILL, all=True), timeout=T)
    assert (await shim.c.wait(task.WaitRequest(id="frozen"), timeout=T)).exit_status == 128 + signal.SIGKILL
    for p in frozen_pids:
        assert await wait_gone(p), f"process {p} of the paused container outlived its SIGKILL"

    kills = [line for line in calls.read_text().splitlines() if line.startswith("kill ") or " kill " in line]
    assert not any(line.endswith(" shared 9") for line in kills), kills
    assert any(line.endswith("kill --all frozen 9") for line in kills), kills
    for name in ("shared", "frozen", "holder2"):
        if name == "holder2":
            await shim.c.kill(task.KillRequest(id=name, signal=signal.SIGKILL), timeout=T)
            await shim.c.wait(task.WaitRequest(id=name), timeout=T)
        await shim.c.delete(task.DeleteRequest(id=name), timeout=T)
        assert not shim.env.cgroup_exists(name) and name not in shim.env.runc_containers()
