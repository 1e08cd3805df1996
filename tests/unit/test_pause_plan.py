"""Which pause specs the runc shim starts itself (shims/runc/pause.py) and which it leaves to runc.

The spec comes from shimd's own ocispec.pause_spec, so a change there that the shim's fork path does
not do (a user namespace, a seccomp profile, another mount) must send the task back to runc, never be
silently dropped. The fork path itself is exercised against real containers in
tests/integration/test_pause_task.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shimd.oci import spec as ocispec
from shims.runc import pause
from shims.runc.runc import RuncOptions

NAMESPACES = {"network": "/run/ns/net", "ipc": "/run/ns/ipc", "uts": "/run/ns/uts"}


def _pod(**kw: Any) -> ocispec.PodContext:
    return ocispec.PodContext(pod_id="p" * 64, name="pod", namespace="default", uid="u", hostname="pod",
                              namespaces=dict(NAMESPACES), cgroups_path="/shimd/podabc/" + "p" * 64, **kw)


def _spec(**kw: Any) -> dict[str, Any]:
    return ocispec.pause_spec(_pod(**kw), "/state/pods/p/pause/rootfs", ["/pause", "-P"])


def test_shimds_pause_spec_is_started_by_the_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHIMD_RUNTIME_FLAVOR", raising=False)
    p = pause.plan(_spec(), "/state/pods/p/pause", RuncOptions())
    assert p is not None
    assert p.args == ["/pause", "-P"] and p.env == ["PATH=/"]
    assert (p.uid, p.gid, p.groups) == (65535, 65535, [])
    assert p.rootfs == "/state/pods/p/pause/rootfs"
    assert p.joined == NAMESPACES
    assert p.cgroups_path == "/shimd/podabc/" + "p" * 64
    # Host IPC: the pod has no IPC namespace of its own, and none is joined.
    spec = _spec()
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "ipc"]
    assert pause.plan(spec, "/b", RuncOptions()).joined == {k: v for k, v in NAMESPACES.items() if k != "ipc"}


def _changed(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(_spec())
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[last] = value
    return spec


@pytest.mark.parametrize(("path", "value"), [
    ("process.user.uid", 0),  # root: runc's business, never a forked process
    ("process.user.uid", -1),  # "unchanged" to setresuid: the task would keep root
    ("process.user.gid", -1),
    ("process.user.uid", 1 << 32),
    ("process.noNewPrivileges", False),
    ("process.capabilities", {"bounding": ["CAP_SYS_ADMIN"], "effective": [], "permitted": []}),
    ("process.terminal", True),
    ("process.args", ["pause"]),  # not an absolute path
    ("process.args", []),
    ("process.cwd", "/tmp"),
    ("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1}]),
    ("root.readonly", False),
    ("mounts", [{"destination": "/etc", "type": "bind", "source": "/etc", "options": ["rbind"]}]),
    ("linux.seccomp", {"defaultAction": "SCMP_ACT_ERRNO"}),
    ("linux.cgroupsPath", "system.slice:shimd:abc"),  # systemd driver
    ("linux.cgroupsPath", "/shimd/../../etc"),
    ("linux.cgroupsPath", "/"),  # the hierarchy's root: Delete would remove every empty cgroup under it
    ("linux.cgroupsPath", "/./"),
    ("linux.resources", {"memory": {"limit": 1 << 20}}),
    ("linux.namespaces", [{"type": "mount"}, {"type": "pid"}, {"type": "user", "path": "/run/ns/user"}]),
    ("linux.namespaces", [{"type": "mount"}, {"type": "pid", "path": "/proc/1/ns/pid"}]),
    ("linux.namespaces", [{"type": "mount"}]),  # no PID namespace of its own
    ("hooks", {"prestart": [{"path": "/bin/true"}]}),
    ("annotations", {"io.kubernetes.cri.container-type": "container"}),
    ("process", "not an object"),
])
def test_anything_more_goes_to_runc(path: str, value: Any) -> None:
    assert pause.plan(_changed(path, value), "/b", RuncOptions()) is None


def test_user_namespace_pods_go_to_runc() -> None:
    mappings = ocispec.IdMappings(uids=((0, 100000, 65536),), gids=((0, 100000, 65536),))
    pod = _pod(userns=mappings)
    pod.namespaces["user"] = "/run/ns/user"
    spec = ocispec.pause_spec(pod, "/r", ["/pause", "-P"])
    assert pause.plan(spec, "/b", RuncOptions()) is None


def test_other_runtimes_and_systemd_cgroups_go_to_runc(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = RuncOptions()
    opts.systemd_cgroup = True
    assert pause.plan(_spec(), "/b", opts) is None
    monkeypatch.setenv("SHIMD_RUNTIME_FLAVOR", "runsc")
    assert pause.plan(_spec(), "/b", RuncOptions()) is None
