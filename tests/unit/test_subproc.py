"""shimd.subproc: helper processes spawned with vfork and awaited through a pidfd (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from shimd import subproc
from tests.support.procs import alive


async def test_stdin_larger_than_a_pipe_reaches_the_process_and_output_comes_back() -> None:
    data = b"0123456789abcdef" * 40000  # 640 KB: several pipe buffers in both directions
    done = await subproc.run(["cat"], time_limit=10, stdin=data)
    assert (done.returncode, done.stdout, done.stderr) == (0, data, b"")


async def test_exit_status_and_stderr_are_reported() -> None:
    done = await subproc.run(["sh", "-c", "echo out; echo err >&2; exit 3"], time_limit=10)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")


async def test_timeout_kills_and_reaps(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        await subproc.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], time_limit=0.5)
    pid = int(pidfile.read_text())
    assert not alive(pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  # WNOHANG; already reaped: no zombie left


async def test_cancellation_kills_the_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(subproc.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], time_limit=60))
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(int(pidfile.read_text()))


async def test_missing_binary_raises() -> None:
    with pytest.raises(FileNotFoundError):
        await subproc.run(["/nonexistent/binary"], time_limit=5)


async def test_descriptors_are_not_inherited(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # not CLOEXEC-cleared on purpose: close_fds must still drop it
    os.set_inheritable(fd, True)
    try:
        done = await subproc.run(["ls", "/proc/self/fd"], time_limit=10)
    finally:
        os.close(fd)
    assert str(fd) not in done.stdout.decode().split()


FREEZER = Path("/sys/fs/cgroup/freezer")


def _exists(pid: int) -> bool:
    """A zombie counts: only its parent collecting it removes the /proc entry."""
    return Path(f"/proc/{pid}").exists()


@pytest.mark.skipif(not (FREEZER / "cgroup.procs").exists(), reason="needs the cgroup v1 freezer")
async def test_helper_stuck_after_sigkill_is_reaped_once_it_exits(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen process does not die of SIGKILL until thawed: past KILL_GRACE it must not stay a zombie."""
    monkeypatch.setattr(subproc, "KILL_GRACE", 0.2)
    cg = FREEZER / f"shimd-test-{os.getpid()}"
    cg.mkdir()
    pidfile = tmp_path / "pid"
    pid = 0
    try:
        script = f"echo $$ > {cg}/cgroup.procs; echo $$ > {pidfile}; echo FROZEN > {cg}/freezer.state; sleep 30"
        with pytest.raises(TimeoutError):
            await subproc.run(["sh", "-c", script], time_limit=1.0)
        pid = int(pidfile.read_text())
        assert pid in subproc.stuck_helpers()
        (cg / "freezer.state").write_text("THAWED")
        # The SIGKILL takes effect on thaw; shimd, its parent, must collect it.
        for _ in range(500):
            if not _exists(pid):
                break
            await asyncio.sleep(0.02)
        assert not _exists(pid), "the killed helper stayed a zombie of its parent"
        assert pid not in subproc.stuck_helpers()
    finally:
        with contextlib.suppress(OSError):
            (cg / "freezer.state").write_text("THAWED")
        if pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222
        for _ in range(100):
            try:
                cg.rmdir()
                break
            except OSError:
                await asyncio.sleep(0.05)
