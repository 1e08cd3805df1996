"""dial_in_netns against a listener inside a network namespace created for the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shimd.errors import NotFound, Unavailable
from shimd.streaming.netns_dial import dial_in_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a network namespace")
PORT = 8080  # inside a fresh namespace every port is free


@pytest.fixture
def netns_httpd(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A pinned netns with lo up and busybox httpd on 127.0.0.1:8080 serving /hello."""
    pin = tmp_path / "netns"
    pin.touch()
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(16).hex().encode()
    (www / "hello").write_bytes(body)
    subprocess.run(["unshare", f"--net={pin}", "true"], check=True, timeout=10)
    httpd = None
    try:
        subprocess.run(["nsenter", f"--net={pin}", "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        httpd = subprocess.Popen(["nsenter", f"--net={pin}", "/bin/busybox", "httpd", "-f",
                                  "-p", f"127.0.0.1:{PORT}", "-h", str(www)])
        yield str(pin), body
    finally:
        if httpd is not None:
            httpd.kill()
            httpd.wait(timeout=10)
        subprocess.run(["umount", str(pin)], check=False, timeout=10)


async def _get(netns: str) -> bytes:
    for _ in range(100):  # httpd needs a moment to bind
        with contextlib.suppress(Unavailable):
            reader, writer = await dial_in_netns(netns, "127.0.0.1", PORT, timeout=5)
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("httpd in the namespace never accepted a connection")
    try:
        writer.write(b"GET /hello HTTP/1.0\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_dial_reaches_listener_inside_namespace(netns_httpd: tuple[str, bytes]) -> None:
    netns, body = netns_httpd
    before = os.readlink("/proc/thread-self/ns/net")
    response = await _get(netns)
    assert response.startswith(b"HTTP/1.") and response.endswith(body)
    assert os.readlink("/proc/thread-self/ns/net") == before  # the loop thread never moved
    # Many dials at once each get their own worker thread, all back in the right place.
    results = await asyncio.gather(*(_get(netns) for _ in range(10)))
    assert all(r.endswith(body) for r in results)
    assert os.readlink("/proc/thread-self/ns/net") == before


async def test_dial_errors(netns_httpd: tuple[str, bytes], tmp_path: Path) -> None:
    netns, _ = netns_httpd
    with pytest.raises(NotFound):
        await dial_in_netns(str(tmp_path / "missing"), "127.0.0.1", PORT, timeout=2)
    with pytest.raises(Unavailable, match="refused"):
        await dial_in_netns(netns, "127.0.0.1", PORT + 1, timeout=2)
