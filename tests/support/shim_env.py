"""Fixtures for shim tests: a busybox rootfs, OCI bundles for runc, and cleanup of everything.

Each test gets private dirs (runc root, shim socket dir, cgroup parent), and at teardown every
shim it started is killed, every runc container force-deleted, every mount under its dirs
unmounted and its cgroups removed, even when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUSYBOX = "/bin/busybox"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def busybox_rootfs(dest: Path) -> Path:
    """A rootfs made of /bin/busybox with one hard link per applet (Debian's static busybox would
    otherwise run applets in-process from its own shell)."""
    (dest / "bin").mkdir(parents=True)
    for d in ("proc", "dev", "sys", "tmp", "etc", "root"):
        (dest / d).mkdir()
    bb = dest / "bin" / "busybox"
    shutil.copy2(BUSYBOX, bb)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in applets:
        if name != "busybox":
            os.link(bb, dest / "bin" / name)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def process_spec(args: list[str], terminal: bool = False, env: list[str] | None = None) -> dict[str, object]:
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
            "CAP_NET_BIND_SERVICE"]
    return {
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": env or ["PATH=/bin", "HOME=/root"],
        "cwd": "/",
        "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        "noNewPrivileges": True,
    }


def runtime_spec(args: list[str], cgroups_path: str, terminal: bool = False) -> dict[str, object]:
    return {
        "ociVersion": "1.0.2",
        "process": process_spec(args, terminal),
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "shimtest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


def _mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def _cgroup_dirs(parent: str) -> list[Path]:
    return [d / parent.lstrip("/") for d in CGROUP_ROOT.iterdir() if (d / parent.lstrip("/")).is_dir()]


def _proc_cwd_under(prefix: str) -> list[int]:
    """Pids whose cwd is under prefix: shims started in a bundle there."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(p / "cwd").startswith(prefix):
                    pids.append(int(p.name))
    return pids


@dataclass
class ShimEnv:
    base: Path
    rootfs: Path
    runc_root: Path
    shim_dir: Path
    cgroup_parent: str
    shimd_address: str
    bundles: list[Path] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"SHIMD_SHIM_DIR": str(self.shim_dir)}

    def bundle(self, name: str, args: list[str], terminal: bool = False, with_rootfs_dir: bool = True) -> Path:
        """A container bundle whose rootfs is an overlay of the busybox tree (mounted by the shim)."""
        b = self.base / "b" / name
        b.mkdir(parents=True)
        spec = runtime_spec(args, f"{self.cgroup_parent}/{name}", terminal)
        (b / "config.json").write_text(json.dumps(spec))
        self.bundles.append(b)
        return b

    def overlay(self, name: str) -> list[dict[str, object]]:
        upper = self.base / "ov" / name / "upper"
        work = self.base / "ov" / name / "work"
        upper.mkdir(parents=True)
        work.mkdir(parents=True)
        return [{"type": "overlay", "source": "overlay",
                 "options": [f"lowerdir={self.rootfs}", f"upperdir={upper}", f"workdir={work}"]}]

    def pod_bundle(self, name: str = "pod") -> Path:
        b = self.base / "p" / name
        b.mkdir(parents=True)
        return b

    def cgroup_exists(self, name: str) -> bool:
        return any((d / name).exists() for d in _cgroup_dirs(self.cgroup_parent))

    def cgroup_dirs(self, name: str) -> list[Path]:
        """The task's cgroup directory in every hierarchy that has it."""
        return [d / name for d in _cgroup_dirs(self.cgroup_parent) if (d / name).is_dir()]

    def runc_containers(self) -> list[str]:
        if not self.runc_root.exists():
            return []
        out = subprocess.run(["runc", "--root", str(self.runc_root), "list", "-q"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        return out.split()

    def cleanup(self) -> None:
        for cid in self.runc_containers():
            subprocess.run(["runc", "--root", str(self.runc_root), "delete", "--force", cid], capture_output=True,
                           timeout=30, check=False)
        for pid in _proc_cwd_under(str(self.base)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mp in sorted(_mounts_under(str(self.base)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        deadline = time.monotonic() + 5
        for d in sorted(_cgroup_dirs(self.cgroup_parent), key=lambda p: len(str(p)), reverse=True):
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(str(p)), reverse=True):
                while time.monotonic() < deadline:
                    try:
                        sub.rmdir()
                        break
                    except OSError:
                        time.sleep(0.05)
            with contextlib.suppress(OSError):
                d.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("bbroot")
    yield busybox_rootfs(base / "rootfs")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shim_env(busybox_tree: Path) -> Iterator[ShimEnv]:
    # Short, private paths: unix socket names must fit in sun_path.
    base = Path(f"/tmp/st-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o755)
    env = ShimEnv(base=base, rootfs=busybox_tree, runc_root=base / "runc", shim_dir=base / "s",
                  cgroup_parent=f"/shimdtest-{base.name}", shimd_address=str(base / "shimd.sock"))
    try:
        yield env
    finally:
        env.cleanup()
