"""shimd's side of the shim zygote (shims/runc/zygote.py): keep one running, ask it for new shims.

Any failure here is reported to the caller, which falls back to starting the shim directly: the
zygote only makes pod start faster and shims lighter, it is never required.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path

from shimd import errors, log

START_TIMEOUT = 15.0
CALL_TIMEOUT = 10.0


class Zygote:
    def __init__(self, argv: list[str], socket_path: str, stamp: str, env: dict[str, str], workdir: Path) -> None:
        self.argv, self.socket_path, self.stamp, self.env, self.workdir = argv, socket_path, stamp, env, workdir
        self._lock = asyncio.Lock()
        self._ready = False
        self.log = log.get("zygote", socket=socket_path)

    def _call_sync(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CALL_TIMEOUT)
            s.connect(self.socket_path)
            socket.send_fds(s, [json.dumps(request).encode()], fds)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        reply: dict[str, object] = json.loads(data or b"{}")
        return reply

    async def _call(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        return await asyncio.to_thread(self._call_sync, request, fds)

    async def _current(self) -> bool:
        try:
            reply = await self._call({"op": "stamp"}, [])
        except (OSError, ValueError):
            return False
        if reply.get("stamp") == self.stamp:
            return True
        # A zygote with other code (shimd was upgraded): it must not fork any more shims.
        with contextlib.suppress(OSError, ValueError):
            await self._call({"op": "exit"}, [])
        return False

    async def ensure(self) -> None:
        """A zygote running this shimd's shim code answers on the socket (started here if not)."""
        async with self._lock:
            if self._ready:
                return
            if not await self._current():
                await self._start()
            self._ready = True

    async def _start(self) -> None:
        await asyncio.to_thread(self.workdir.mkdir, parents=True, exist_ok=True)
        errlog = await asyncio.to_thread(os.open, str(self.workdir / "zygote.log"),
                                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            # setsid -f: the zygote lives in its own session, outside shimd's process tree.
            proc = await asyncio.create_subprocess_exec(
                "setsid", "-f", *self.argv, self.socket_path, cwd=str(self.workdir),
                stdin=asyncio.subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                env={**os.environ, **self.env})
        finally:
            os.close(errlog)
        async with asyncio.timeout(START_TIMEOUT):
            await proc.wait()
        for _ in range(int(START_TIMEOUT / 0.02)):
            if await self._current():
                self.log.info("shim zygote started")
                return
            await asyncio.sleep(0.02)
        raise errors.Unavailable(f"the shim zygote did not answer within {START_TIMEOUT:g}s")

    async def fork_shim(self, flags: dict[str, str], cwd: Path, env: dict[str, str], socket_path: str,
                        listen_fd: int) -> int:
        """A new shim serving on listen_fd; returns its pid."""
        await self.ensure()
        request = {"flags": flags, "cwd": str(cwd), "env": env, "socket_path": socket_path}
        try:
            reply = await self._call(request, [listen_fd])
        except (OSError, ValueError) as e:
            self._ready = False  # start (or re-check) a zygote next time
            raise errors.Unavailable(f"shim zygote: {e}") from None
        if "error" in reply or not reply.get("pid"):
            raise errors.ShimdError(f"shim zygote: {reply.get('error', 'no pid in reply')}")
        return int(reply["pid"])  # type: ignore[call-overload]

    async def stop(self) -> None:
        """Ends the zygote (when no pod is left, and at uninstall); shims it made are not affected."""
        await stop_at(self.socket_path)
        self._ready = False


def _exit_sync(socket_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CALL_TIMEOUT)
        s.connect(socket_path)
        s.sendall(json.dumps({"op": "exit"}).encode())
        while s.recv(4096):
            pass


async def stop_at(socket_path: str) -> None:
    """Ends whatever zygote serves socket_path, also one a previous shimd (killed, never asked for a shim
    since its restart) started; then removes the socket so no later connect reaches a dead end."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(_exit_sync, socket_path)
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(os.unlink, socket_path)


class ZygoteSlot:
    """The one zygote of this shimd, made on first use: every handler whose runtime forks its shims from a
    zygote (runc, runsc) shares it, since they run the same shim code."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket_path = str(state_dir / "s" / "zygote")
        self._zygote: Zygote | None = None

    def get(self, argv: list[str], stamp: str, env: dict[str, str]) -> Zygote:
        if self._zygote is None:
            self._zygote = Zygote(argv, self.socket_path, stamp, {**env, "SHIMD_ZYGOTE_STAMP": stamp},
                                  self.state_dir / "zygote")
        return self._zygote

    async def stop(self) -> None:
        if self._zygote is not None:
            await self._zygote.stop()
        else:
            # This shimd forked no shim since it started, but a predecessor's zygote may still be running.
            await stop_at(self.socket_path)
