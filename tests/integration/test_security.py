"""Security contexts on real runc containers, checked from inside with id and /proc/self/status."""

from __future__ import annotations

import json
import os
from typing import Any

import grpc
import pytest

from tests.support.runtime import Runtime

CAP_BITS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6,
    "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31,
}
DEFAULT = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
           "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
           "CAP_AUDIT_WRITE"]


def _mask(caps: list[str]) -> int:
    return sum(1 << CAP_BITS[c] for c in caps)


def _sh(rt: Runtime, cid: str, script: str) -> tuple[int, str]:
    r = rt.client.runtime.ExecSync(rt.pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=10))
    return r.exit_code, (r.stdout + r.stderr).decode()


def _status(rt: Runtime, cid: str) -> dict[str, str]:
    _, out = _sh(rt, cid, "cat /proc/self/status")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _run(rt: Runtime, pod_id: str, pod_cfg: Any, name: str, **sc: Any) -> str:
    pb = rt.pb
    cid = rt.create(pod_id, pod_cfg, name, ["sleep", "120"],
                    linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**sc)))
    rt.start(cid)
    return cid


def _names(rt: Runtime) -> list[str]:
    return sorted(c.metadata.name for c in rt.client.runtime.ListContainers(rt.pb.ListContainersRequest()).containers)


def test_users_caps_nnp_seccomp_readonly(rt: Runtime) -> None:
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("sec")

    plain = _run(rt, pod_id, pod_cfg, "plain")
    assert _sh(rt, plain, "id -u; id -g; id -G") == (0, "0\n0\n0\n")
    st = _status(rt, plain)
    assert int(st["CapEff"], 16) == _mask(DEFAULT)
    assert int(st["CapBnd"], 16) == _mask(DEFAULT)
    assert st["NoNewPrivs"] == "0"
    assert st["Seccomp"] == "0"  # kubelet sends no seccomp field for Unconfined

    user = _run(rt, pod_id, pod_cfg, "user", run_as_user=pb.Int64Value(value=1000),
                run_as_group=pb.Int64Value(value=3000), supplemental_groups=[4000, 5000])
    assert _sh(rt, user, "id -u; id -g; id -G") == (0, "1000\n3000\n3000 4000 5000\n")
    # ContainerStatus reports the effective identity (kubelet shows it for SupplementalGroupsPolicy).
    ident = rt.status(user).user.linux
    assert (ident.uid, ident.gid, list(ident.supplemental_groups)) == (1000, 3000, [3000, 4000, 5000])
    st = _status(rt, user)
    assert st["Uid"].split()[0] == "1000" and st["Gid"].split()[0] == "3000"
    # A non-root process has the bounding set but no effective capabilities.
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == _mask(DEFAULT)

    named = _run(rt, pod_id, pod_cfg, "named", run_as_username="app")
    assert _sh(rt, named, "id -u; id -g") == (0, "1000\n1000\n")

    tight = _run(rt, pod_id, pod_cfg, "tight", no_new_privs=True, readonly_rootfs=True,
                 capabilities=pb.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["CHOWN", "KILL"]),
                 seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault))
    st = _status(rt, tight)
    want = [c for c in DEFAULT if c not in ("CAP_CHOWN", "CAP_KILL")] + ["CAP_NET_ADMIN"]
    assert int(st["CapEff"], 16) == _mask(want)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    code, out = _sh(rt, tight, "touch /newfile")
    assert code != 0 and "Read-only file system" in out
    # Masked and read-only /proc paths.
    assert _sh(rt, tight, "wc -c < /proc/timer_list") == (0, "0\n")
    assert _sh(rt, tight, "wc -c < /proc/interrupts") == (0, "0\n")
    code, _ = _sh(rt, tight, "echo 1 > /proc/sys/vm/drop_caches")
    assert code != 0
    # The default profile refuses new namespaces even where capabilities would not.
    code, out = _sh(rt, tight, "unshare -U true")
    assert code != 0

    # Bad input: INVALID_ARGUMENT naming the field, and nothing created.
    before = _names(rt)
    for sc, field in (
        (dict(capabilities=pb.Capability(add_capabilities=["FLY"])), "capabilities"),
        (dict(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                         localhost_ref="/nonexistent/profile.json")), "seccomp"),
        (dict(run_as_username="nosuchuser"), "nosuchuser"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            rt.create(pod_id, pod_cfg, "bad", ["true"],
                      linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**sc)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert field in e.value.details()
    assert _names(rt) == before


def test_localhost_seccomp_profile(rt: Runtime, tmp_path: Any) -> None:
    pb = rt.pb
    profile = tmp_path / "deny-mkdir.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}))
    pod_id, pod_cfg = rt.run_pod("lsec")
    cid = _run(rt, pod_id, pod_cfg, "c", seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                                                    localhost_ref=str(profile)))
    code, out = _sh(rt, cid, "mkdir /tmp/x")
    assert code != 0 and "Operation not permitted" in out
    assert _sh(rt, cid, "touch /tmp/y && echo ok") == (0, "ok\n")


def test_privileged_sysctls_host_namespaces(rt: Runtime) -> None:
    pb = rt.pb
    ns = pb.NamespaceOption(pid=pb.NODE, ipc=pb.NODE)
    # A hostIPC pod cannot set an IPC sysctl (it would change the host's); refused before anything is made.
    with pytest.raises(grpc.RpcError) as e:
        rt.run_pod("priv", linux=pb.LinuxPodSandboxConfig(
            sysctls={"kernel.shm_rmid_forced": "1", "net.ipv4.ping_group_range": "0 2000"},
            security_context=pb.LinuxSandboxSecurityContext(privileged=True, namespace_options=ns)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kernel.shm_rmid_forced" in e.value.details()
    assert rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []

    pod_id, pod_cfg = rt.run_pod(
        "priv2", linux=pb.LinuxPodSandboxConfig(
            sysctls={"net.ipv4.ping_group_range": "0 2000"},
            security_context=pb.LinuxSandboxSecurityContext(privileged=True, namespace_options=ns)))
    cid = _run(rt, pod_id, pod_cfg, "p", privileged=True, namespace_options=ns)
    st = _status(rt, cid)
    assert int(st["CapEff"], 16) == int(open("/proc/self/status").read().split("CapBnd:")[1].split()[0], 16)
    assert st["Seccomp"] == "0"
    assert _sh(rt, cid, "cat /proc/sys/net/ipv4/ping_group_range") == (0, "0\t2000\n")
    # Host PID and IPC namespaces; all host devices.
    _, comm = _sh(rt, cid, "cat /proc/1/comm")
    assert comm.strip() != "sleep"
    _, ipc = _sh(rt, cid, "readlink /proc/self/ns/ipc")
    assert ipc.strip() == os.readlink("/proc/self/ns/ipc")
    assert _sh(rt, cid, "test -c /dev/null && test -e /dev/" + _some_host_device() + " && echo ok") == (0, "ok\n")
    # Unmasked /proc.
    _, out = _sh(rt, cid, "head -c 1 /proc/timer_list | wc -c")
    assert out.strip() == "1"

    # Non-namespaced sysctl: refused.
    with pytest.raises(grpc.RpcError) as e:
        rt.run_pod("bad-sysctl", linux=pb.LinuxPodSandboxConfig(sysctls={"kernel.panic": "1"}))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kernel.panic" in e.value.details()


def _some_host_device() -> str:
    for name in ("kvm", "loop0", "fuse", "net/tun", "zero"):
        if os.path.exists(f"/dev/{name}"):
            return name
    return "null"


def test_privileged_annotation_does_not_make_a_privileged_pod(rt: Runtime) -> None:
    """The pod's author writes its annotations: only the sandbox config kubelet sends says privileged."""
    pb = rt.pb
    pod_id, pod_cfg = rt.run_pod("annotated", annotations={"shimd.io/privileged": "true"})
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "p", ["true"], linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(privileged=True)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "privileged" in e.value.details()
    assert _names(rt) == []
