"""Issue 16 item 10 on the real daemon: the CRI socket's mode from birth, the shim's API socket not
inherited by what the shim runs."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import REPO, ShimdProcess
from tests.support.procs import shim_pids
from tests.support.runtime import Runtime

O_CLOEXEC = 0o2000000


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_cri_socket_is_never_bound_where_others_could_reach_it(tmp_base: Path) -> None:
    """Under umask 0 a socket bound at its final path is 0777 until the chmod: it must be bound privately."""
    proc = ShimdProcess(tmp_base)
    trace = tmp_base / "bind.trace"
    log = open(proc.log_path, "ab")
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=bind", "-o", str(trace),
         sys.executable, "-m", "shimd", "serve", "--config", str(proc.config_path)],
        stdout=log, stderr=log, cwd=REPO, start_new_session=True, preexec_fn=lambda: os.umask(0))
    log.close()
    daemon = 0
    try:
        for _ in range(600):
            if os.path.exists(proc.socket) or tracer.poll() is not None:
                break
            time.sleep(0.05)
        assert os.path.exists(proc.socket), proc.log_tail()
        daemon = _children(tracer.pid)[0]
        mode = stat.S_IMODE(os.stat(proc.socket).st_mode)
        assert mode == 0o660, oct(mode)
        bound = re.findall(r'sun_path="([^"]+)"', trace.read_text())
        assert bound, "strace saw no unix bind"
        assert proc.socket not in bound, f"the CRI socket was bound at its final path: {bound}"
    finally:
        if daemon:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGTERM)
        try:
            tracer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            tracer.kill()
            if daemon:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(daemon, signal.SIGKILL)
            tracer.wait(timeout=10)


def test_shim_api_socket_is_close_on_exec(rt: Runtime) -> None:
    """Every runc, runsc and hook process the shim starts would otherwise hold the shim's listening socket."""
    pod_id, pod_cfg = rt.run_pod("cloexec")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "120"])
    rt.start(cid)  # the shim has served connections, so accepted sockets are checked too
    (shim,) = shim_pids(pod_id)
    sockets = []
    for fd in os.listdir(f"/proc/{shim}/fd"):
        if int(fd) <= 2:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{shim}/fd/{fd}").startswith("socket:"):
                with open(f"/proc/{shim}/fdinfo/{fd}") as f:
                    flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
                sockets.append((int(fd), bool(flags & O_CLOEXEC)))
    assert sockets, "the shim holds no socket"
    inheritable = [fd for fd, cloexec in sockets if not cloexec]
    assert not inheritable, f"shim {shim} socket descriptors without close-on-exec: {inheritable}"
