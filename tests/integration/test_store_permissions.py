"""Issue 16 item 3: no local user may walk into an image snapshot, a container's writable layer or its bundle
(where setuid files a container or an image put there would be host root); a user-namespaced pod's mapped root
reaches its own rootfs and pod files, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.test_userns import HOST_ID, ctr_linux, run_in_userns, userns
from tests.integration.test_userns import traversable_base as traversable_base  # autouse here too
from tests.support.runtime import Runtime, exec_sync

NOBODY = 65534

_PROBE = """
import json, os, sys
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[1]))
out = {}
for path in sys.argv[3:]:
    try:
        os.stat(path)
        out[path] = True
    except PermissionError:
        out[path] = False
print(json.dumps(out))
"""


def _reachable(uid: int, gid: int, paths: list[Path]) -> dict[str, bool]:
    """Which paths a process with only these ids can reach (stat), asked of a real process that drops root."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(uid), str(gid), *map(str, paths)],
                          capture_output=True, text=True, timeout=30, check=True)
    result: dict[str, bool] = json.loads(done.stdout)
    return result


def _snapshot_file(root: Path) -> Path:
    for p in sorted((root / "images").rglob("busybox")):
        if p.is_file() and "snapshots" in p.parts:
            return p
    raise AssertionError("no unpacked busybox in the snapshots")


def test_nobody_cannot_reach_snapshots_writable_layers_or_bundles(rt: Runtime) -> None:
    pod_id, pod_cfg = rt.run_pod("perm")
    cid = rt.create(pod_id, pod_cfg, "c", ["sh", "-c", "echo secret > /marker && sleep 1000"])
    rt.start(cid)
    root, state = rt.proc.root, rt.proc.state
    upper = root / "rw" / cid / "upper" / "marker"
    merged = state / "containers" / cid / "rootfs" / "marker"
    for _ in range(200):
        if upper.exists():
            break
        time.sleep(0.05)
    assert upper.exists() and merged.exists()
    targets = [upper, merged, _snapshot_file(root), state / "containers" / cid / "config.json",
               state / "pods" / pod_id / "hosts"]
    reachable = _reachable(NOBODY, NOBODY, targets)
    assert not any(reachable.values()), {p: r for p, r in reachable.items() if r}
    # The daemon's own directories stay traversable (the socket's and userns pods' way in), not listable.
    assert _reachable(NOBODY, NOBODY, [root, state]) == {str(root): True, str(state): True}


def test_userns_pod_root_reaches_its_own_rootfs_only(rt: Runtime) -> None:
    pb = rt.pb
    ns = userns(pb)
    pod_id, pod_cfg, cid = run_in_userns(rt, "permns", ns, ["sh", "-c", "echo mine > /marker && sleep 1000"])
    other_pod, other_cfg = rt.run_pod("permhost")
    other = rt.create(other_pod, other_cfg, "c", ["sleep", "1000"])
    rt.start(other)
    code, _, err = exec_sync(rt, cid, ["cat", "/marker"])
    assert code == 0, err
    root, state = rt.proc.root, rt.proc.state
    own = state / "containers" / cid / "rootfs" / "marker"
    not_its_own = [root / "rw" / cid / "upper" / "marker", _snapshot_file(root),
                   state / "containers" / other / "rootfs", state / "pods" / other_pod / "hosts"]
    seen = _reachable(HOST_ID, HOST_ID, [own, state / "pods" / pod_id / "hosts", *not_its_own])
    assert seen.pop(str(own)) and seen.pop(str(state / "pods" / pod_id / "hosts"))
    assert not any(seen.values()), {p: r for p, r in seen.items() if r}
    assert not any(_reachable(NOBODY, NOBODY, [own]).values())
    # A second container in the same pod starts too (runc's init passes through its bundle as mapped root).
    second = rt.create(pod_id, pod_cfg, "second", ["true"], linux=ctr_linux(pb, ns))
    rt.start(second)
    assert rt.wait_state(second, pb.CONTAINER_EXITED).exit_code == 0


def test_directories_left_open_by_an_older_shimd_are_closed_at_start(rt: Runtime) -> None:
    pod_id, pod_cfg = rt.run_pod("permold")
    cid = rt.create(pod_id, pod_cfg, "c", ["sleep", "1000"])
    rt.start(cid)
    root, state = rt.proc.root, rt.proc.state
    dirs = [root / "images", root / "rw", root / "rw" / cid, state / "containers" / cid, state / "pods" / pod_id]
    rt.proc.kill()
    for d in dirs:
        d.chmod(0o755)  # what shimd made them under a 022 umask before
    rt.proc.start()
    assert {str(d): d.stat().st_mode & 0o777 for d in dirs} == {str(d): 0o700 for d in dirs}
    assert rt.status(cid).state == rt.pb.CONTAINER_RUNNING
