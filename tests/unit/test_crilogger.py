"""The binary:// CRI log writer as a shim v2 binary runs it: stdout on fd 3, stderr on fd 4, ready on fd 5."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

from shimd.runtimes.shimv2 import REPO_ROOT, logger_script

LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) ([FP]) (.*)$")


def _spawn(script: Path, log: Path) -> tuple[int, int, int, int]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.posix_spawn(str(script), [str(script), "log", str(log)],
                         {"CONTAINER_ID": "c1", "CONTAINER_NAMESPACE": "k8s.io"},
                         file_actions=[(os.POSIX_SPAWN_DUP2, out_r, 3), (os.POSIX_SPAWN_DUP2, err_r, 4),
                                       (os.POSIX_SPAWN_DUP2, ready_w, 5)])
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    return pid, out_w, err_w, ready_r


def _wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_crilogger_writes_cri_lines_and_follows_rotation(tmp_path: Path) -> None:
    script = tmp_path / "shimd-crilogger"
    script.write_text(logger_script(sys.executable, REPO_ROOT))
    script.chmod(0o755)
    log = tmp_path / "logs" / "0.log"
    log.parent.mkdir()
    pid, out_w, err_w, ready_r = _spawn(script, log)
    try:
        assert os.read(ready_r, 1) == b""  # closed once ready
        os.write(out_w, b"hello\npart")
        os.write(err_w, b"oops\n")
        _wait_for(lambda: log.exists() and b"oops" in log.read_bytes())
        os.kill(pid, signal.SIGTERM)  # ignored: only EOF ends the logger
        os.rename(log, str(log) + ".1")
        time.sleep(1.1)
        os.write(out_w, b"-rest\nafter\n")
        _wait_for(lambda: log.exists() and b"after" in log.read_bytes())
        os.close(out_w)
        os.write(err_w, b"tail")
        os.close(err_w)
        out_w = err_w = -1
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in (out_w, err_w, ready_r):
            if fd >= 0:
                os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    old = [LINE.match(x) for x in Path(str(log) + ".1").read_bytes().splitlines()]
    new = [LINE.match(x) for x in log.read_bytes().splitlines()]
    assert all(old) and all(new)
    assert [(m.group(1), m.group(2), m.group(3)) for m in old if m] == [(b"stdout", b"F", b"hello"),
                                                                        (b"stderr", b"F", b"oops")]
    assert [(m.group(1), m.group(2), m.group(3)) for m in new if m] == [(b"stdout", b"F", b"part-rest"),
                                                                        (b"stdout", b"F", b"after"),
                                                                        (b"stderr", b"F", b"tail")]
