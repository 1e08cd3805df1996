"""Stray shims of a pod (a RunPodSandbox cut short by a crash) are found by name or -id and by their
working directory, and killed; a process of the same name elsewhere is left alone."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

from shimd.shimmgr import strays

POD = "ab12cd34ef" + "0" * 54


def _start(exe: Path, cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(exe), *args], cwd=cwd)


def test_find_and_kill(tmp_path: Path) -> None:
    pod_dir, other = tmp_path / "pods" / POD, tmp_path / "elsewhere"
    (pod_dir / "pause").mkdir(parents=True)
    other.mkdir()
    named = tmp_path / f"shim-{POD[:10]}"  # the executable's name becomes the process name (comm)
    shutil.copy(shutil.which("sleep") or "/bin/sleep", named)
    by_name = _start(named, pod_dir / "pause", "60")
    decoy = _start(named, other, "60")
    # A shim v2 binary: recognised by `-id <pod id>` on its command line.
    by_id = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-id", POD], cwd=pod_dir)
    try:
        deadline = time.monotonic() + 10
        while {by_name.pid, by_id.pid} - set(strays.find(POD, pod_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(strays.find(POD, pod_dir)) == sorted([by_name.pid, by_id.pid])
        killed = asyncio.run(strays.kill(POD, pod_dir))
        assert sorted(killed) == sorted([by_name.pid, by_id.pid])
        assert by_name.wait(timeout=5) == -9 and by_id.wait(timeout=5) == -9
        assert decoy.poll() is None
    finally:
        for p in (by_name, decoy, by_id):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)
