"""daemon.state on a tmpfs (shimd/state_fs.py): mounted when empty, found again after a crash, never stacked,
never over state an earlier shimd left on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.daemon import REPO, ShimdProcess
from tests.support.runtime import Runtime, started_runtime


def _mounts_at(path: Path) -> list[tuple[str, str]]:
    """(filesystem type, source) of each mount at exactly path, bottom first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                out.append((right.split()[0], right.split()[1]))
    return out


def test_state_is_mounted_once_and_survives_a_crash(tmp_path: Path, busybox_registry: tuple[str, str],
                                                    cni_loopback_dir: Path) -> None:
    base = tmp_path / "sd"
    base.mkdir()

    def factory(extra: str) -> ShimdProcess:
        return ShimdProcess(base, extra, state_tmpfs=True)

    with started_runtime(factory, busybox_registry, cni_loopback_dir) as rt:
        state = rt.proc.state
        assert _mounts_at(state) == [("tmpfs", "shimd-state")]
        assert oct(state.stat().st_mode & 0o7777) == "0o711"
        pb = rt.pb
        # A pod with a pause task: its binary is linked from the copy on the tmpfs.
        pod_id, cfg = rt.run_pod("tmpfs-pod")
        cid = rt.create(pod_id, cfg, "c", ["sleep", "1000"])
        rt.start(cid)
        rt.wait_state(cid, pb.CONTAINER_RUNNING)
        assert (state / "pause").is_file()
        assert (state / "pods" / pod_id / "pause" / "rootfs" / "pause").stat().st_ino == (state / "pause").stat().st_ino

        rt.proc.kill()
        rt.proc.start()
        assert _mounts_at(state) == [("tmpfs", "shimd-state")], "a restart must reuse the mount, not stack one"
        assert rt.status(cid).state == pb.CONTAINER_RUNNING
        st = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert st.state == pb.SANDBOX_READY
        assert "daemon.state filesystem" in rt.proc.log_path.read_text()
        check = _check(rt)
        assert f"daemon.state {state} is on tmpfs" in check, check


def test_state_left_on_disk_is_not_hidden(tmp_path: Path, busybox_registry: tuple[str, str],
                                          cni_loopback_dir: Path) -> None:
    base = tmp_path / "sd"
    (base / "run").mkdir(parents=True)
    (base / "run" / "left-by-an-earlier-shimd").write_text("state")

    def factory(extra: str) -> ShimdProcess:
        return ShimdProcess(base, extra, state_tmpfs=True)

    with started_runtime(factory, busybox_registry, cni_loopback_dir) as rt:
        assert _mounts_at(rt.proc.state) == []
        assert (rt.proc.state / "left-by-an-earlier-shimd").read_text() == "state"
        assert "kept: it already holds state" in rt.proc.log_path.read_text()
        check = _check(rt)
        assert "every pod's files are made there on disk" in check, check


def _check(rt: Runtime) -> str:
    done = subprocess.run([sys.executable, "-m", "shimd", "check", "--config", str(rt.proc.config_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    return done.stdout + done.stderr
