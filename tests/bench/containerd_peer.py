"""A private containerd 1.6 instance (Debian's) with the CRI plugin, for side-by-side benchmarks.

Its own root, state, config, socket and CNI conf dir: it never touches /var/lib/containerd or
/run/containerd, so it can run next to anything else. Plain-HTTP registries are declared as
mirrors of themselves with an http:// endpoint; snapshots use overlayfs.

    peer = ContainerdPeer(base, plain_http_registries=["127.0.0.1:5000"], cni_conf_dir=confdir)
    client = peer.start()          # tests.support.cri_client.CriClient on peer.socket
    ...
    peer.stop()                    # SIGTERM, unmount what it left under base, optionally wipe base
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from shimd import mounts
from tests.support.cri_client import CriClient
from tests.support.procs import terminate

NETNS_DIR = "/var/run/netns"
CONTAINERD = "/usr/bin/containerd"


class ContainerdPeer:
    def __init__(self, base: Path, plain_http_registries: list[str] | tuple[str, ...] = (),
                 cni_conf_dir: Path | None = None, cni_bin_dir: str = "/usr/lib/cni",
                 runc_binary: str = "runc", log_level: str = "info", sandbox_image: str = "",
                 state_tmpfs: bool = False) -> None:
        """state_tmpfs: its state directory (with runc's --root moved into it) on a tmpfs, as /run/containerd
        is on a host whose /run is tmpfs; benchmarks give shimd's daemon.state the same."""
        self.base = Path(base)
        self.state_tmpfs = state_tmpfs
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.socket = str(self.base / "containerd.sock")
        self.config_path = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.cni_conf_dir = cni_conf_dir or self.base / "cni"
        self.cni_bin_dir = cni_bin_dir
        self.registries = list(plain_http_registries)
        self.runc_binary = runc_binary
        self.log_level = log_level
        self.sandbox_image = sandbox_image
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CriClient | None = None
        self._netns_before: set[str] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def config_text(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        lines = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",',
            '  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]',
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.socket}.ttrpc"',
            "[debug]",
            f'  level = "{self.log_level}"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.base / "opt"}"',
            f"[{cri}]",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  enable_selinux = false",
            "  disable_apparmor = true",
            "  restrict_oom_score_adj = true",
        ]
        if self.sandbox_image:
            lines.append(f'  sandbox_image = "{self.sandbox_image}"')
        lines += [
            f"[{cri}.containerd]",
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]",
            '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]",
            f'  BinaryName = "{self.runc_binary}"',
            *([f'  Root = "{self.state / "runc"}"'] if self.state_tmpfs else []),
            "  SystemdCgroup = false",
            f"[{cri}.cni]",
            f'  bin_dir = "{self.cni_bin_dir}"',
            f'  conf_dir = "{self.cni_conf_dir}"',
        ]
        for host in self.registries:
            lines += [f'[{cri}.registry.mirrors."{host}"]', f'  endpoint = ["http://{host}"]']
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> CriClient:
        for d in (self.root, self.state, self.cni_conf_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.state_tmpfs and not mounts.is_mount_sync(self.state):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0711", "containerd-state", str(self.state)],
                           check=True, timeout=10)
        # containerd pins pod netns under /var/run/netns, outside base: remember what was there before.
        self._netns_before = set(os.listdir(NETNS_DIR)) if os.path.isdir(NETNS_DIR) else set()
        try:
            self.config_path.write_text(self.config_text())
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([CONTAINERD, "--config", str(self.config_path)], stdout=log,
                                             stderr=log, start_new_session=True)
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.socket):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"containerd did not create {self.socket}")
                time.sleep(0.05)
            self.client = CriClient(self.socket)
            self.client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()  # the daemon, its mounts (the state's tmpfs) and pins go, whatever failed
            raise
        return self.client

    def stop(self, wipe: bool = False) -> None:
        if self.client:
            self.client.close()
            self.client = None
        if self.proc and self.proc.poll() is None:
            terminate(self.proc, 15, 5)
        self.unmount_all()
        self.remove_netns_pins()
        if wipe:
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.base)], check=False)

    def unmount_all(self) -> None:
        """Lazily unmount anything containerd left mounted under base (deepest first)."""
        prefix = str(self.base) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            with contextlib.suppress(OSError):
                subprocess.run(["umount", "-l", mp], check=False, capture_output=True, timeout=10)

    def remove_netns_pins(self) -> None:
        """The cni-* netns pins containerd made during this run (it keeps them when pods are not removed)."""
        if not os.path.isdir(NETNS_DIR):
            return
        for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
            if name.startswith("cni-"):
                path = os.path.join(NETNS_DIR, name)
                subprocess.run(["umount", path], check=False, capture_output=True, timeout=10)
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
