"""Pinned pod namespaces: real unshare/nsenter, real mounts."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import pytest

from shimd.errors import InvalidArgument, ShimdError
from shimd.network import namespaces as ns


def _mounts_under(base: Path) -> list[str]:
    real = os.path.realpath(base)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(real + "/")]


def _mount_count(path: Path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == real)


def _nsenter(args: list[str], *cmd: str) -> str:
    return subprocess.run(["nsenter", *args, *cmd], check=True, capture_output=True, text=True, timeout=10).stdout


async def test_create_all_kinds(ns_base: Path) -> None:
    paths = await ns.create_pod_namespaces("pod-a", ns_base, ["network", "ipc", "uts"], "pod-a-host")
    assert set(paths) == {"network", "ipc", "uts"}
    for kind, path in paths.items():
        assert ns.namespace_alive(path)
        host = os.stat(f"/proc/self/ns/{ns.KINDS[kind]}")
        assert os.stat(path).st_ino != host.st_ino, f"{kind} is the host's namespace"
    assert _nsenter([f"--uts={paths['uts']}"], "hostname").strip() == "pod-a-host"
    links = _nsenter([f"--net={paths['network']}"], "ip", "-o", "link", "show")
    assert len(links.strip().splitlines()) == 1 and "lo:" in links and "UP" in links
    assert os.uname().nodename != "pod-a-host"

    await ns.remove_pod_namespaces("pod-a", ns_base)
    assert not any(ns.namespace_alive(p) for p in paths.values())
    assert not (ns_base / "pod-a").exists()
    assert _mounts_under(ns_base) == []
    await ns.remove_pod_namespaces("pod-a", ns_base)  # idempotent


async def test_subset_and_empty_hostname(ns_base: Path) -> None:
    paths = await ns.create_pod_namespaces("pod-b", ns_base, ["uts"], "")
    assert list(paths) == ["uts"]
    assert _nsenter([f"--uts={paths['uts']}"], "hostname").strip() == os.uname().nodename
    assert sorted(os.listdir(ns_base / "pod-b")) == ["uts"]
    await ns.remove_pod_namespaces("pod-b", ns_base)
    assert await ns.create_pod_namespaces("pod-c", ns_base, [], "x") == {}


@pytest.mark.parametrize(
    ("pod_id", "kinds", "hostname", "word"),
    [("p", ["pid"], "h", "pid"), ("../x", ["network"], "h", "pod id"), ("p", ["uts"], "h" * 65, "hostname")],
)
async def test_invalid_arguments(ns_base: Path, pod_id: str, kinds: list[str], hostname: str, word: str) -> None:
    with pytest.raises(InvalidArgument, match=word):
        await ns.create_pod_namespaces(pod_id, ns_base, kinds, hostname)
    assert os.listdir(ns_base) == []


async def test_failure_leaves_nothing(ns_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: pinning the second namespace fails after the first pin was mounted.
    real_mount = ns._mount

    def failing_mount(source: str, target: str, flags: int) -> None:
        if target.endswith("/uts"):
            raise OSError(errno.EIO, "injected")
        real_mount(source, target, flags)

    monkeypatch.setattr(ns, "_mount", failing_mount)
    with pytest.raises(ShimdError, match="pod-f"):
        await ns.create_pod_namespaces("pod-f", ns_base, ["network", "uts"], "h")
    assert not (ns_base / "pod-f").exists()
    assert _mounts_under(ns_base) == []


async def test_cancellation_leaves_nothing(ns_base: Path) -> None:
    for delay in (0, 0.001, 0.005, 0.02):
        task = asyncio.create_task(ns.create_pod_namespaces("pod-x", ns_base, ["network", "ipc", "uts"], "h"))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            await ns.remove_pod_namespaces("pod-x", ns_base)
        assert not (ns_base / "pod-x").exists()
        assert _mounts_under(ns_base) == []


async def test_existing_pins_are_not_touched(ns_base: Path) -> None:
    paths = await ns.create_pod_namespaces("pod-d", ns_base, ["network"], "h")
    with pytest.raises(ShimdError, match="already exist"):
        await ns.create_pod_namespaces("pod-d", ns_base, ["network"], "h")
    assert ns.namespace_alive(paths["network"])
    await ns.remove_pod_namespaces("pod-d", ns_base)


async def test_many_concurrent(ns_base: Path) -> None:
    ids = [f"pod-{i}" for i in range(20)]
    created = await asyncio.gather(*(ns.create_pod_namespaces(i, ns_base, ["network", "ipc"], i) for i in ids))
    inodes = {os.stat(p["network"]).st_ino for p in created}
    assert len(inodes) == len(ids)
    assert len(_mounts_under(ns_base)) == 2 * len(ids)
    await asyncio.gather(*(ns.remove_pod_namespaces(i, ns_base) for i in ids))
    assert _mounts_under(ns_base) == [] and os.listdir(ns_base) == []


async def test_unmount_propagates_to_later_mount_namespaces(ns_base: Path) -> None:
    """A mount namespace created after the pin (as runc does, rslave) must not keep the netns alive."""
    paths = await ns.create_pod_namespaces("pod-p", ns_base, ["network"], "h")
    holder = await asyncio.create_subprocess_exec("unshare", "-m", "--propagation", "slave", "sleep", "60")
    try:
        mnt = f"--mount=/proc/{holder.pid}/ns/mnt"
        for _ in range(100):  # wait until the holder has its own mount namespace
            if os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino:
                break
            await asyncio.sleep(0.02)
        assert paths["network"] in _nsenter([mnt], "cat", "/proc/self/mountinfo")
        await ns.remove_pod_namespaces("pod-p", ns_base)
        assert paths["network"] not in _nsenter([mnt], "cat", "/proc/self/mountinfo")
    finally:
        holder.kill()
        await asyncio.wait_for(holder.wait(), timeout=5)


async def test_base_dir_survives_restart(ns_base: Path) -> None:
    """A second process (a restarted shimd) must not stack another bind mount on base_dir."""
    paths = await ns.create_pod_namespaces("pod-r", ns_base, ["network"], "h")
    ns._prepared.clear()  # what a fresh process sees
    await ns.create_pod_namespaces("pod-s", ns_base, ["network"], "h")
    assert _mount_count(ns_base) == 1
    assert ns.namespace_alive(paths["network"])
    await ns.remove_pod_namespaces("pod-r", ns_base)
    await ns.remove_pod_namespaces("pod-s", ns_base)


def test_namespace_alive_on_other_files(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("")
    assert not ns.namespace_alive(str(f))
    assert not ns.namespace_alive(str(tmp_path / "missing"))
    assert ns.namespace_alive("/proc/self/ns/net")
