"""Readiness as systemd and installers see it: sd_notify READY/STOPPING, and `shimd check`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shimd import sdnotify
from tests.support.daemon import REPO, ShimdProcess
from tests.support.runtime import runtime_config


def _recv_all(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except (BlockingIOError, TimeoutError):
            return out


def test_sd_notify_ready_after_listening_and_stopping(shimd_factory: Callable[..., ShimdProcess], tmp_base: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_base / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(0.5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        proc = shimd_factory()
        proc.start()
        msgs = _recv_all(s)
        assert len(msgs) == 1, msgs
        fields = msgs[0].split("\n")
        assert "READY=1" in fields and f"MAINPID={proc.proc.pid}" in fields  # type: ignore[union-attr]
        proc.stop()
        assert "STOPPING=1" in _recv_all(s)


def test_sd_notify_without_socket_is_a_no_op(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "missing")}) is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        name = f"shimd-test-{os.getpid()}"
        s.bind(b"\0" + name.encode())
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name}) is True
        assert s.recv(100) == b"READY=1"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shimd", "check", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120, check=False)


def test_check_passes_on_a_working_node(shimd_factory: Callable[..., ShimdProcess], cni_loopback_dir: Path,
                                        tmp_base: Path) -> None:
    proc = shimd_factory(runtime_config("127.0.0.1:1", cni_loopback_dir))
    proc.start()
    out = _check("--config", str(proc.config_path), "--kubelet-config", str(tmp_base / "none.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answers on" in out.stdout and "RuntimeReady" in out.stdout and "NetworkReady" in out.stdout
    out = _check("--config", str(proc.config_path), "--json", "--kubelet-config", str(tmp_base / "none.yaml"))
    assert out.stdout.startswith("["), out.stdout[:500]
    found = json.loads(out.stdout)
    assert {f["area"] for f in found} >= {"config", "host", "cgroups", "handler runc", "cni", "socket", "daemon"}
    assert not [f for f in found if f["level"] == "fail"]
    assert any(f["area"] == "handler runc" and "compiled shim" in f["message"] and f["level"] == "ok" for f in found)


def test_check_says_which_shim_runs_a_handlers_pods(tmp_base: Path) -> None:
    cfg = tmp_base / "c.toml"
    base = (f'[daemon]\nsocket = "{tmp_base}/none.sock"\nstate = "{tmp_base}/run"\nroot = "{tmp_base}/root"\n'
            '[handlers.runc]\ndriver = "runc"\n')
    cfg.write_text(base + 'shim = "python"\n')
    out = _check("--config", str(cfg), "--no-daemon", "--json")
    runc = [f for f in json.loads(out.stdout) if f["area"] == "handler runc"]
    assert any("Python shim" in f["message"] and f["level"] == "ok" for f in runc), runc
    # No compiled shim where shimd looks: a warning for "auto", a failure for "native".
    for shim, level in (("auto", "warn"), ("native", "fail")):
        cfg.write_text(base + f'shim = "{shim}"\n')
        out = subprocess.run([sys.executable, "-m", "shimd", "check", "--config", str(cfg), "--no-daemon", "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
                             env={**os.environ, "SHIMD_NATIVE_SHIM": str(tmp_base / "missing")})
        runc = [f for f in json.loads(out.stdout) if f["area"] == "handler runc"]
        assert any("is not installed" in f["message"] and f["level"] == level for f in runc), (shim, runc)


def test_check_names_what_is_wrong(tmp_base: Path) -> None:
    empty_cni = tmp_base / "cni"
    empty_cni.mkdir()
    kubelet = tmp_base / "kubelet.yaml"
    kubelet.write_text("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: systemd\n")
    cfg = tmp_base / "bad.toml"
    cfg.write_text(f'[daemon]\nsocket = "{tmp_base}/none.sock"\nstate = "{tmp_base}/run"\nroot = "{tmp_base}/root"\n'
                   'default_handler = "broken"\n'
                   '[handlers.broken]\ndriver = "runc"\nbinary = "/nonexistent/runc"\n'
                   f'[cni]\nconf_dir = "{empty_cni}"\n')
    out = _check("--config", str(cfg), "--kubelet-config", str(kubelet), "--no-daemon")
    assert out.returncode == 1, out.stdout
    text = out.stdout
    assert "FAIL  handler broken" in text and "/nonexistent/runc" in text
    assert "FAIL  cni" in text and str(empty_cni) in text
    assert "kubelet uses cgroupDriver 'systemd'" in text
    assert "fix:" in text
    assert "does not exist: shimd is not running" in text
    # A config file that does not parse is reported, not a traceback.
    cfg.write_text("[daemon]\nbogus = 1\n")
    out = _check("--config", str(cfg))
    assert out.returncode == 1 and "daemon.bogus" in out.stderr and "Traceback" not in out.stderr
