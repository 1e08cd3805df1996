"""Runs a real shimd process on private paths for a test session and stops it afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shimd.store import lifecycle
from tests.support.cri_client import CriClient
from tests.support.procs import terminate

REPO = Path(__file__).resolve().parents[2]


class ShimdProcess:
    """One shimd instance. Paths live under `base` so parallel test runs never collide."""

    def __init__(self, base: Path, extra_config: str = "", state_tmpfs: bool = False) -> None:
        """state_tmpfs: shimd mounts a tmpfs at its state directory (the default outside tests); off here,
        so that a test's mounts are only what its pods made (tests/integration/test_state_tmpfs.py covers
        it, and the benchmarks run with it). unmount_state() removes it once the daemon is done with it."""
        self.base = base
        self.socket = str(base / "run" / "shimd.sock")
        self.root = base / "root"
        self.state = base / "run"
        self.config_path = base / "config.toml"
        self.log_path = base / "shimd.log"
        self.config_path.write_text(
            "[daemon]\n"
            f'socket = "{self.socket}"\nroot = "{self.root}"\nstate = "{self.state}"\nlog_level = "debug"\n'
            f"state_tmpfs = {'true' if state_tmpfs else 'false'}\n"
            f"{extra_config}"
            # Parallel test daemons must not fight over the streaming port.
            + ("" if "[streaming]" in extra_config else '[streaming]\naddress = "127.0.0.1:0"\n')
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CriClient | None = None

    def start(self, timeout: float = 20.0) -> CriClient:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimd", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, cwd=REPO, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None:
                raise RuntimeError(f"shimd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()  # a daemon that came up too late must not outlive the caller's failure
                raise TimeoutError(f"shimd did not create {self.socket}:\n{self.log_tail()}")
            time.sleep(0.05)
        try:
            self.client = CriClient(self.socket)
            self.client.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()  # also when the client cannot even be built (e.g. its protos are missing)
            raise
        return self.client

    def kill(self) -> None:
        """SIGKILL, as a crash would: shims must survive this."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.client:
            self.client.close()
            self.client = None

    def stop(self) -> None:
        if self.client:
            self.client.close()
            self.client = None
        if self.proc and self.proc.poll() is None:
            terminate(self.proc, 15, 5)
        self.assert_no_illegal_state_change()

    def unmount_state(self) -> None:
        """The tmpfs shimd mounted at its state directory (state_tmpfs), as an uninstall would remove it;
        after stop(), once every pod is gone (what is mounted inside it is unmounted with it)."""
        subprocess.run(["umount", "-l", str(self.state)], capture_output=True, check=False, timeout=20)

    def assert_no_illegal_state_change(self) -> None:
        """Every test that runs a shimd also checks the state machines (shimd/store/lifecycle.py)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        bad = [line for line in text.splitlines() if lifecycle.MARKER in line]
        assert not bad, "shimd made an illegal state change:\n" + "\n".join(bad[:5])

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
