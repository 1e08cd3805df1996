"""User namespaces (hostUsers: false) on real runc, through the grpcio CRI client.

The pod's user namespace is created with kubelet's mappings; its network, IPC and UTS namespaces
are created inside it and pinned with it; containers join it by path and see their rootfs owned by
root through idmapped image layers.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_pod_lifecycle import assert_no_leftovers
from tests.support.network import NetRuntime
from tests.support.runtime import Runtime, exec_sync

HOST_ID = 200000 + 3 * 65536  # where kubelet would put the fourth pod's range
LENGTH = 65536


@pytest.fixture(autouse=True)
def traversable_base(tmp_base: Path) -> Iterator[None]:
    """pytest's temp dirs are 0700; the mapped root (an unprivileged host uid) must traverse to the
    rootfs and pod files, as it can under /run/shimd and /var/lib/shimd (0711)."""
    changed: list[tuple[Path, int]] = []
    d = tmp_base
    while d != d.parent:
        mode = d.stat().st_mode & 0o7777
        if not mode & 0o001:
            changed.append((d, mode))
            os.chmod(d, mode | 0o011)
        d = d.parent
    try:
        yield
    finally:
        for path, mode in changed:
            os.chmod(path, mode)


def userns(pb: Any, host_id: int = HOST_ID, mode: Any = None, pid: Any = None) -> Any:
    maps = [pb.IDMapping(host_id=host_id, container_id=0, length=LENGTH)]
    opts = pb.UserNamespace(mode=pb.POD if mode is None else mode, uids=maps, gids=list(maps))
    return pb.NamespaceOption(pid=pb.CONTAINER if pid is None else pid, userns_options=opts)


def pod_linux(pb: Any, ns: Any) -> Any:
    return pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns))


def ctr_linux(pb: Any, ns: Any) -> Any:
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(namespace_options=ns))


def host_status_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a host process, as the host sees them."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])


def container_pid(rt: Runtime, cid: str) -> int:
    st = rt.client.runtime.ContainerStatus(rt.pb.ContainerStatusRequest(container_id=cid, verbose=True))
    return int(json.loads(st.info["info"])["pid"])


def run_in_userns(rt: Runtime, name: str, ns: Any, command: list[str]) -> tuple[str, Any, str]:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod(name, linux=pod_linux(pb, ns))
    cid = rt.create(pod_id, pod_cfg, "main", command, linux=ctr_linux(pb, ns))
    rt.start(cid)
    rt.wait_state(cid, pb.CONTAINER_RUNNING)
    return pod_id, pod_cfg, cid


def ok(rt: Runtime, cid: str, cmd: list[str]) -> str:
    code, out, err = exec_sync(rt, cid, cmd)
    assert code == 0, f"{cmd} failed ({code}): {err}"
    return out.strip()


def test_userns_pod_on_a_cni_network(net_rt: NetRuntime) -> None:
    rt, pb = net_rt.rt, net_rt.rt.pb
    pod_id, _, cid = run_in_userns(rt, "userns-net", userns(pb), ["sleep", "3600"])
    ip = rt.client.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
    assert ipaddress.ip_address(ip) in net_rt.net.subnet

    assert ok(rt, cid, ["cat", "/proc/self/uid_map"]).split() == ["0", str(HOST_ID), str(LENGTH)]
    assert ok(rt, cid, ["cat", "/proc/self/gid_map"]).split() == ["0", str(HOST_ID), str(LENGTH)]
    assert ok(rt, cid, ["id", "-u"]) == "0"
    # Idmapped image layers: the image's files and the rootfs itself belong to root inside.
    assert ok(rt, cid, ["stat", "-c", "%u:%g", "/bin/sh", "/etc/passwd", "/"]).split() == ["0:0"] * 3
    assert ok(rt, cid, ["sh", "-c", "echo written > /etc/userns-test && cat /etc/userns-test"]) == "written"
    assert ok(rt, cid, ["sh", "-c", "echo x >> /etc/passwd && stat -c %u /etc/passwd"]) == "0"
    # The namespaces the user namespace owns can be used: sysfs, proc, mqueue, hostname.
    assert ip in ok(rt, cid, ["ip", "addr", "show", "eth0"])
    assert ok(rt, cid, ["hostname"]) == "userns-net"
    gateway = str(net_rt.net.subnet.network_address + 1)
    assert ok(rt, cid, ["ping", "-c", "1", "-W", "5", gateway])

    # On the host the container's root is the mapped, unprivileged uid; files it wrote are owned by it.
    assert host_status_ids(container_pid(rt, cid)) == (HOST_ID, HOST_ID)
    status = rt.client.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True))
    upper = Path(json.loads(status.info["info"])["writableLayer"]) / "upper"
    assert (upper / "etc" / "userns-test").stat().st_uid == HOST_ID
    pins = rt.proc.state / "ns" / pod_id
    assert sorted(p.name for p in pins.iterdir()) == ["ipc", "network", "user", "uts"]

    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_userns_shared_pid_namespace(rt: Runtime) -> None:
    """shareProcessNamespace: the pause task holding the PID namespace runs in the user namespace too."""
    pb = rt.pb
    pod_id, _, cid = run_in_userns(rt, "userns-pid", userns(pb, pid=pb.POD), ["sleep", "3600"])
    assert ok(rt, cid, ["cat", "/proc/1/uid_map"]).split() == ["0", str(HOST_ID), str(LENGTH)]
    assert "/pause" in ok(rt, cid, ["cat", "/proc/1/cmdline"])
    assert ok(rt, cid, ["id", "-u"]) == "0"
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def test_userns_pod_survives_a_shimd_crash_and_is_removed_completely(rt: Runtime) -> None:
    """The user namespace pin is found again after a restart, and removal takes it with the others."""
    pb = rt.pb
    pod_id, pod_cfg, cid = run_in_userns(rt, "userns-crash", userns(pb), ["sleep", "3600"])
    rt.proc.kill()  # SIGKILL: no chance to tear anything down
    rt.proc.start()
    assert rt.status(cid).state == pb.CONTAINER_RUNNING
    assert ok(rt, cid, ["id", "-u"]) == "0"
    second = rt.create(pod_id, pod_cfg, "second", ["sleep", "3600"], linux=ctr_linux(pb, userns(pb)))
    rt.start(second)
    assert ok(rt, second, ["stat", "-c", "%u", "/bin/sh"]) == "0"
    rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert_no_leftovers(rt, pod_id)


def invalid(call: Any, *fields: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    for f in fields:
        assert f in e.value.details()
    return str(e.value.details())


def test_userns_bad_input_creates_nothing(rt: Runtime) -> None:
    pb = rt.pb
    pod_field = "config.linux.security_context.namespace_options.userns_options"
    ctr_field = "linux.security_context.namespace_options.userns_options"
    invalid(lambda: rt.run_pod("bad", linux=pod_linux(pb, userns(pb, mode=pb.TARGET))), f"{pod_field}.mode")
    no_uids = userns(pb)
    no_uids.userns_options.ClearField("uids")
    invalid(lambda: rt.run_pod("bad", linux=pod_linux(pb, no_uids)), f"{pod_field}.uids")
    host_net = userns(pb)
    host_net.network = pb.NODE
    invalid(lambda: rt.run_pod("bad", linux=pod_linux(pb, host_net)), pod_field, "network")
    invalid(lambda: rt.run_pod("bad", handler="runsc", linux=pod_linux(pb, userns(pb))), pod_field, "'runsc'")
    assert rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert not (rt.proc.state / "ns").exists() or list((rt.proc.state / "ns").iterdir()) == []

    pod_id, pod_cfg = rt.run_pod("good", linux=pod_linux(pb, userns(pb)))
    invalid(lambda: rt.create(pod_id, pod_cfg, "c", ["true"], linux=ctr_linux(pb, userns(pb, HOST_ID + LENGTH))),
            ctr_field, "differ")
    invalid(lambda: rt.create(pod_id, pod_cfg, "c", ["true"]), ctr_field)
    invalid(lambda: rt.create(pod_id, pod_cfg, "c", ["true"], linux=ctr_linux(pb, userns(pb, mode=pb.CONTAINER))),
            f"{ctr_field}.mode")
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    plain_id, plain_cfg = rt.run_pod("plain")
    invalid(lambda: rt.create(plain_id, plain_cfg, "c", ["true"], linux=ctr_linux(pb, userns(pb))),
            ctr_field, "no user namespace")
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []


def test_status_reports_user_namespace_support(rt: Runtime) -> None:
    handlers = rt.client.runtime.Status(rt.pb.StatusRequest()).runtime_handlers
    features = {h.name: h.features.user_namespaces for h in handlers}
    assert features[""] is True and features["runc"] is True
    assert features["runsc"] is False
