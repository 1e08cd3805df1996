"""spawn_serving records the shim's address before the shim exists (a crash right after the fork must
still leave the pod's teardown a way to reach and stop that shim), and removes it when no shim came."""

import asyncio
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
