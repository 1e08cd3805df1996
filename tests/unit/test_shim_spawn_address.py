"""spawn_serving records the shim's address before the shim exists (a crash right after the fork must
still leave the pod's teardown a way to reach and stop that shim), and removes it when no shim came."""

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from shimd import errors
from shimd.shimmgr.launcher import DirectLaunch, spawn_serving


class RecordingZygote:
    def __init__(self, bundle: Path, fail: bool = False) -> None:
        self.bundle, self.fail, self.seen_address = bundle, fail, ""

    async def fork_shim(self, flags: dict[str, str], cwd: Path, env: dict[str, str], socket_path: str,
                        listen_fd: int) -> int:
        self.seen_address = (self.bundle / "address").read_text()
        if self.fail:
            raise errors.ShimdError("zygote gone")
        return 4242


def _launch(tmp_path: Path, argv: list[str]) -> DirectLaunch:
    return DirectLaunch(argv=argv, env={}, socket_path=str(tmp_path / "s" / "shim.sock"),
                        listen_fd_env="LISTEN_FD", flags={"id": "pod"})


def test_address_written_before_the_fork(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    zygote: Any = RecordingZygote(bundle)
    path = asyncio.run(spawn_serving(_launch(tmp_path, ["true"]), bundle=bundle, timeout=10, zygote=zygote))
    assert zygote.seen_address == f"unix://{path}"
    assert (bundle / "address").read_text() == f"unix://{path}"


def test_address_removed_when_no_shim_starts(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    zygote: Any = RecordingZygote(bundle, fail=True)
    # The zygote fails, then the direct launch fails too: setsid rejects what it takes for an option.
    with pytest.raises(errors.ShimdError, match="setsid exited"):
        asyncio.run(spawn_serving(_launch(tmp_path, ["--no-such-setsid-option"]), bundle=bundle, timeout=10,
                                  zygote=zygote))
    assert zygote.seen_address.startswith("unix://")
    assert not (bundle / "address").exists()
    assert not (tmp_path / "s" / "shim.sock").exists()


def test_a_shim_that_detaches_itself_is_waited_for_only_until_its_first_process_exits(tmp_path: Path) -> None:
    """detaches_itself: the first process exits at once, the shim runs on (here: a child of a shell that
    records its session and the socket it got); a failing first process fails the launch and leaves no
    address."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    out = tmp_path / "out"
    # The session id of the process left running (field 6 of its stat) is the first process's pid ($$).
    script = (f'(sleep 0.2; echo "$(cut -d" " -f6 /proc/self/stat) $$ $LISTEN_FD $SHIMD_SHIM_SOCKET" > {out}.tmp; '
              f'mv {out}.tmp {out}) & exit 0')
    launch = DirectLaunch(argv=["sh", "-c", script], env={}, socket_path=str(tmp_path / "s" / "shim.sock"),
                          listen_fd_env="LISTEN_FD", flags={}, detaches_itself=True)
    path = asyncio.run(spawn_serving(launch, bundle=bundle, timeout=10))
    assert (bundle / "address").read_text() == f"unix://{path}"
    assert _wait_for(out), "the detached process did not run on"
    session, pid, fd, sock = out.read_text().split()
    assert session == pid, "a session of its own"
    assert fd.isdigit() and sock == path
    failing = DirectLaunch(argv=["sh", "-c", "exit 3"], env={}, socket_path=str(tmp_path / "s2" / "shim.sock"),
                           listen_fd_env="LISTEN_FD", flags={}, detaches_itself=True)
    bundle2 = tmp_path / "bundle2"
    bundle2.mkdir()
    with pytest.raises(errors.ShimdError, match="exited 3"):
        asyncio.run(spawn_serving(failing, bundle=bundle2, timeout=10))
    assert not (bundle2 / "address").exists()


def _wait_for(path: Path) -> bool:
    for _ in range(100):
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def test_a_launch_cancelled_while_its_socket_is_made_leaves_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket, the address file and the stderr log are made in one thread hop, which a cancellation cannot
    stop: what it made is closed and removed once it ends."""
    import os
    import threading

    from shimd.shimmgr import launcher

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    entered, release = threading.Event(), threading.Event()
    real_write = launcher._write_address_file

    def slow_write(b: Path, address: str) -> None:
        entered.set()
        release.wait(10)
        real_write(b, address)

    monkeypatch.setattr(launcher, "_write_address_file", slow_write)
    fds_before = set(os.listdir("/proc/self/fd"))

    async def main() -> None:
        task = asyncio.ensure_future(spawn_serving(_launch(tmp_path, ["true"]), bundle=bundle, timeout=10))
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done(), "the launch waits for the thread before it gives up"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not (tmp_path / "s" / "shim.sock").exists()
    assert not (bundle / "address").exists()
    assert set(os.listdir("/proc/self/fd")) <= fds_before, "the socket and the log are closed"
