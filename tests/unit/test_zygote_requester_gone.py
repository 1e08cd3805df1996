"""The shim zygote forks no shim for a requester that hung up (a shimd that died after asking):
its successor may already have torn that pod down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POD = "fe98dc76ba" + "1" * 54


def _named(name: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == name:
                        out.append(int(pid))
            except OSError:
                pass
    return out


def test_no_fork_for_a_requester_that_hung_up(tmp_path: Path) -> None:
    path = str(tmp_path / "zygote")
    zygote = subprocess.Popen([sys.executable, "-S", "-OO", "-m", "shims.runc.zygote", path], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert time.monotonic() < deadline and zygote.poll() is None, "zygote did not start"
            time.sleep(0.05)
        # A silent first client keeps the zygote (one request at a time) busy while the second asks and
        # leaves: the request is then read only after its sender is gone.
        busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        busy.connect(path)
        listener.bind(str(tmp_path / "shim.sock"))
        listener.listen(1)
        asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        asker.connect(path)
        request = {"flags": {"id": POD}, "cwd": str(tmp_path), "env": {}, "socket_path": str(tmp_path / "shim.sock")}
        socket.send_fds(asker, [json.dumps(request).encode()], [listener.fileno()])
        asker.close()
        busy.close()
        time.sleep(1.0)
        assert _named(f"shim-{POD[:10]}") == []
        # A requester that stays gets its shim (the check does not refuse everything).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(path)
            socket.send_fds(s, [json.dumps(request).encode()], [listener.fileno()])
            reply = json.loads(s.makefile().readline())
        assert reply.get("pid"), reply
        os.kill(int(reply["pid"]), 9)
    finally:
        listener.close()
        for pid in _named(f"shim-{POD[:10]}"):
            os.kill(pid, 9)
        zygote.kill()
        zygote.wait(timeout=10)
