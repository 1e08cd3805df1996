"""Seccomp profiles and the security parts of the OCI spec builder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.cri import validate
from shimd.oci import seccomp, spec

RD = cri.SecurityProfileProfileType.RuntimeDefault
UNCONFINED = cri.SecurityProfileProfileType.Unconfined
LOCALHOST = cri.SecurityProfileProfileType.Localhost


def _pod(**kw: Any) -> spec.PodContext:
    base: dict[str, Any] = dict(pod_id="p" * 64, name="pod", namespace="ns", uid="u", hostname="pod",
                                namespaces={"network": "/run/ns/net", "ipc": "/run/ns/ipc", "uts": "/run/ns/uts"},
                                files={}, cgroups_path="/shimd/podx/c")
    base.update(kw)
    return spec.PodContext(**base)


def _image(tmp_path: Path) -> spec.ImageContext:
    etc = tmp_path / "layer" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1000:\nwheel:x:10:app\naudio:x:29:app\n")
    return spec.ImageContext(name="img", config={"Cmd": ["sh"], "User": "app"}, layers=[str(tmp_path / "layer")])


def _profile(kind: cri.SecurityProfileProfileType, ref: str = "") -> cri.SecurityProfile:
    """As decoded from kubelet's request: present on the wire even when every field is the default."""
    return cri.SecurityProfile().parse(bytes(cri.SecurityProfile(profile_type=kind, localhost_ref=ref)))


def _build(tmp_path: Path, sc: cri.LinuxContainerSecurityContext, pod: spec.PodContext | None = None,
           res: cri.LinuxContainerResources | None = None) -> dict[str, Any]:
    linux = cri.LinuxContainerConfig(security_context=sc)
    if res is not None:
        linux.resources = res
    cfg = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="img"), linux=linux)
    return spec.container_spec("c" * 64, cfg, pod or _pod(), _image(tmp_path), "/rootfs", min_oom=-1000)


def _denied(profile: dict[str, Any]) -> set[str]:
    return {n for s in profile["syscalls"] if "args" not in s for n in s["names"]}


def test_default_profile_denies_by_capability() -> None:
    p = seccomp.default_profile(spec.DEFAULT_CAPS, "x86_64")
    assert p["defaultAction"] == "SCMP_ACT_ALLOW"
    assert "SCMP_ACT_X86_64".replace("ACT", "ARCH") in p["architectures"]
    d = _denied(p)
    assert {"mount", "unshare", "setns", "kexec_load", "init_module", "bpf", "keyctl", "ptrace", "clone3",
            "settimeofday", "reboot", "open_by_handle_at", "userfaultfd"} <= d
    assert not {"read", "write", "clone", "execve", "chown", "kill", "setuid"} & d
    # clone with a namespace flag is refused, plain clone (threads, fork) is not.
    clone_rules = [s for s in p["syscalls"] if s["names"] == ["clone"]]
    assert {r["args"][0]["value"] for r in clone_rules} >= {0x10000000, 0x20000000, 0x40000000, 0x00020000}

    admin = _denied(seccomp.default_profile([*spec.DEFAULT_CAPS, "CAP_SYS_ADMIN", "CAP_SYS_TIME"], "x86_64"))
    assert "mount" not in admin and "settimeofday" not in admin and "bpf" not in admin
    assert "keyctl" in admin  # no capability makes keyrings safe


def test_runtime_default_unconfined_and_privileged(tmp_path: Path) -> None:
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp=_profile(RD)))
    assert s["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp_profile_path="runtime/default"))
    assert "seccomp" in s["linux"]
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp=_profile(UNCONFINED)))
    assert "seccomp" not in s["linux"]
    assert "seccomp" not in _build(tmp_path, cri.LinuxContainerSecurityContext())["linux"]
    priv = _build(tmp_path, cri.LinuxContainerSecurityContext(privileged=True, seccomp=_profile(RD)),
                  pod=_pod(privileged_pod=True))
    assert "seccomp" not in priv["linux"]
    assert "maskedPaths" not in priv["linux"] and "readonlyPaths" not in priv["linux"]
    assert priv["process"]["capabilities"]["bounding"] == [c for c in spec.ALL_CAPS if c in spec.host_caps()]
    assert any(d["path"] == "/dev/null" for d in priv["linux"]["devices"])
    assert priv["linux"]["resources"]["devices"] == [{"allow": True, "access": "rwm"}]
    cg = next(m for m in priv["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert "ro" not in cg["options"]


def test_localhost_profile(tmp_path: Path) -> None:
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                                "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                                             {"names": ["mount"], "action": "SCMP_ACT_ALLOW",
                                              "includes": {"caps": ["CAP_SYS_ADMIN"]}}]}))
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp=_profile(LOCALHOST, str(prof))))
    assert s["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert s["linux"]["seccomp"]["syscalls"] == [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}]
    with pytest.raises(errors.InvalidArgument, match=r"seccomp.*does not exist"):
        _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp=_profile(
            LOCALHOST, str(tmp_path / "missing.json"))))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(errors.InvalidArgument, match=r"defaultAction"):
        _build(tmp_path, cri.LinuxContainerSecurityContext(seccomp_profile_path=f"localhost/{tmp_path}/bad.json"))


def test_apparmor(tmp_path: Path) -> None:
    # RuntimeDefault and Unconfined need nothing from a host without AppArmor.
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(apparmor=_profile(RD)))
    assert "apparmorProfile" not in s["process"]
    if not spec.apparmor_supported():
        with pytest.raises(errors.InvalidArgument, match=r"apparmor.*AppArmor is not enabled"):
            _build(tmp_path, cri.LinuxContainerSecurityContext(apparmor=_profile(
                LOCALHOST, "my-profile")))


def test_sysctls() -> None:
    private = {"network", "ipc", "uts"}
    spec.validate_sysctls({"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1",
                           "fs.mqueue.msg_max": "20", "net/ipv4/ping_group_range": "0 1"}, private)
    with pytest.raises(errors.InvalidArgument, match=r"kernel.panic.*not namespaced"):
        spec.validate_sysctls({"kernel.panic": "1"}, private)
    with pytest.raises(errors.InvalidArgument, match=r"net.ipv4.ip_forward.*network namespace"):
        spec.validate_sysctls({"net.ipv4.ip_forward": "1"}, {"ipc"})
    with pytest.raises(errors.InvalidArgument, match=r"kernel.sem.*ipc"):
        spec.validate_sysctls({"kernel.sem": "1 2 3 4"}, {"network"})
    with pytest.raises(errors.InvalidArgument, match=r"not a sysctl name"):
        spec.validate_sysctls({"../../x": "1"}, private)


def test_capabilities_and_users(tmp_path: Path) -> None:
    sc = cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["NET_ADMIN"],
                                                                       drop_capabilities=["CHOWN"]))
    caps = _build(tmp_path, sc)["process"]["capabilities"]["effective"]
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps
    with pytest.raises(errors.InvalidArgument, match=r"unknown capability 'CAP_FLY'"):
        _build(tmp_path, cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["FLY"])))
    # Image user "app": its /etc/group memberships merge with the supplemental groups...
    user = _build(tmp_path, cri.LinuxContainerSecurityContext(supplemental_groups=[5000]))["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10, 29, 5000]}
    # ...unless the policy is Strict.
    user = _build(tmp_path, cri.LinuxContainerSecurityContext(
        supplemental_groups=[5000], supplemental_groups_policy=cri.SupplementalGroupsPolicy.Strict))["process"]["user"]
    assert user == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 5000]}
    user = _build(tmp_path, cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(0),
                                                              run_as_group=cri.Int64Value(7)))["process"]["user"]
    assert user == {"uid": 0, "gid": 7, "additionalGids": [7]}
    with pytest.raises(errors.InvalidArgument, match=r"run_as_user"):
        _build(tmp_path, cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(-3)))


def _userns_opts(host: int = 100000, mode: cri.NamespaceMode = cri.NamespaceMode.POD) -> cri.NamespaceOption:
    return cri.NamespaceOption(userns_options=cri.UserNamespace(
        mode=mode, uids=[cri.IdMapping(host_id=host, container_id=0, length=65536)],
        gids=[cri.IdMapping(host_id=host, container_id=0, length=65536)]))


def _userns_pod(host: int = 100000) -> spec.PodContext:
    mappings = spec.user_namespace(_userns_opts(host), spec.POD_USERNS_FIELD)
    return _pod(namespaces={"network": "/run/ns/net", "ipc": "/run/ns/ipc", "uts": "/run/ns/uts",
                            "user": "/run/ns/user"}, userns=mappings)


def test_user_namespace_joins_the_pods(tmp_path: Path) -> None:
    s = _build(tmp_path, cri.LinuxContainerSecurityContext(namespace_options=_userns_opts()), pod=_userns_pod())
    assert {"type": "user", "path": "/run/ns/user"} in s["linux"]["namespaces"]
    assert {"type": "network", "path": "/run/ns/net"} in s["linux"]["namespaces"]
    assert s["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert s["linux"]["gidMappings"] == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    # A pause task holding a shared PID namespace is created in the user namespace too.
    pause = spec.pause_spec(_userns_pod(), "/pause-rootfs", ["/pause"])
    assert {"type": "user", "path": "/run/ns/user"} in pause["linux"]["namespaces"]
    assert pause["linux"]["uidMappings"] == s["linux"]["uidMappings"]


@pytest.mark.parametrize(("sc_ns", "pod_kw", "match"), [
    (_userns_opts(), {}, "the pod sandbox has no user namespace"),  # container asks, pod has none
    (cri.NamespaceOption(), {"userns": True}, "must ask for it"),  # pod has one, container does not
    (_userns_opts(300000), {"userns": True}, "differ from the pod sandbox"),
    (_userns_opts(mode=cri.NamespaceMode.TARGET), {"userns": True}, r"userns_options.mode must be NODE or POD"),
])
def test_user_namespace_must_match_the_pod(tmp_path: Path, sc_ns: cri.NamespaceOption, pod_kw: dict[str, Any],
                                           match: str) -> None:
    pod = _userns_pod() if pod_kw.get("userns") else _pod()
    with pytest.raises(errors.InvalidArgument, match=match) as e:
        _build(tmp_path, cri.LinuxContainerSecurityContext(namespace_options=sc_ns), pod=pod)
    assert spec.CTR_USERNS_FIELD in str(e.value)


def test_user_namespace_node_mode_is_the_host() -> None:
    assert spec.user_namespace(_userns_opts(mode=cri.NamespaceMode.NODE), "f") is None
    assert spec.user_namespace(cri.NamespaceOption(), "f") is None


@pytest.mark.parametrize(("uids", "match"), [
    ([], r"f\.uids must not be empty"),
    ([cri.IdMapping(host_id=1, container_id=0, length=0)], r"f\.uids\[0\] has an empty or overflowing range"),
    ([cri.IdMapping(host_id=2**32 - 10, container_id=0, length=65536)], r"f\.uids\[0\] .*overflowing"),
    ([cri.IdMapping(host_id=100000, container_id=0, length=100),
      cri.IdMapping(host_id=100050, container_id=100, length=100)], r"f\.uids has overlapping ranges"),
    ([cri.IdMapping(host_id=100000, container_id=0, length=100),
      cri.IdMapping(host_id=200000, container_id=50, length=100)], r"f\.uids has overlapping ranges"),
])
def test_user_namespace_ranges(uids: list[cri.IdMapping], match: str) -> None:
    ns = _userns_opts()
    ns.userns_options.uids = uids
    with pytest.raises(errors.InvalidArgument, match=match):
        spec.user_namespace(ns, "f")
    ns = _userns_opts()
    ns.userns_options.gids = []
    with pytest.raises(errors.InvalidArgument, match=r"f\.gids must not be empty"):
        spec.user_namespace(ns, "f")


def test_user_namespace_host_root() -> None:
    m = spec.user_namespace(_userns_opts(200000), "f")
    assert m is not None and m.host_root() == (200000, 200000)
    ns = _userns_opts()
    ns.userns_options.uids = [cri.IdMapping(host_id=100001, container_id=1, length=10)]
    m = spec.user_namespace(ns, "f")
    assert m is not None and m.host_root() is None


def test_pod_user_namespace_validation() -> None:
    cfg = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p", namespace="n", uid="u"),
                               linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
                                   namespace_options=_userns_opts())))
    assert validate.pod_userns(cfg) is not None
    assert validate.pod_config(cfg).userns == validate.pod_userns(cfg)  # parsed once, handed to the pod service
    cfg.linux.security_context.namespace_options.network = cri.NamespaceMode.NODE
    with pytest.raises(errors.InvalidArgument, match=r"config\.linux\.security_context\.namespace_options\."
                                                     r"userns_options: .*host's network namespace"):
        validate.pod_config(cfg)
    cfg.linux.security_context.namespace_options.network = cri.NamespaceMode.POD
    cfg.linux.security_context.namespace_options.userns_options.mode = cri.NamespaceMode.CONTAINER
    with pytest.raises(errors.InvalidArgument, match=r"config\.linux.*userns_options\.mode must be NODE or POD"):
        validate.pod_config(cfg)


@pytest.mark.parametrize(("res", "field"), [
    (cri.LinuxContainerResources(cpu_shares=1), "cpu_shares"),
    (cri.LinuxContainerResources(cpu_quota=-2), "cpu_quota"),
    (cri.LinuxContainerResources(cpu_period=999), "cpu_period"),
    (cri.LinuxContainerResources(memory_limit_in_bytes=-1), "memory_limit_in_bytes"),
    (cri.LinuxContainerResources(memory_limit_in_bytes=1 << 61), "memory_limit_in_bytes"),
    (cri.LinuxContainerResources(memory_limit_in_bytes=1 << 30, memory_swap_limit_in_bytes=1 << 20),
     "memory_swap_limit_in_bytes"),
    (cri.LinuxContainerResources(oom_score_adj=2000), "oom_score_adj"),
    (cri.LinuxContainerResources(cpuset_cpus="0-x"), "cpuset_cpus"),
    (cri.LinuxContainerResources(cpuset_cpus="3-1"), "cpuset_cpus"),
    (cri.LinuxContainerResources(hugepage_limits=[cri.HugepageLimit(page_size="2M", limit=1)]), "page_size"),
    (cri.LinuxContainerResources(unified={"../memory.max": "1"}), "unified"),
])
def test_bad_resources(tmp_path: Path, res: cri.LinuxContainerResources, field: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=field):
        _build(tmp_path, cri.LinuxContainerSecurityContext(), res=res)


def test_merge_resources() -> None:
    old = cri.LinuxContainerResources(cpu_shares=512, cpu_quota=50000, memory_limit_in_bytes=1 << 26,
                                      unified={"memory.high": "100"})
    new = cri.LinuxContainerResources(cpu_quota=150000, unified={"pids.max": "10"})
    m = spec.merge_resources(old, new)
    assert (m.cpu_shares, m.cpu_quota, m.memory_limit_in_bytes) == (512, 150000, 1 << 26)
    assert m.unified == {"memory.high": "100", "pids.max": "10"}


def test_caps_limited_to_what_the_host_holds() -> None:
    held = set(spec.ALL_CAPS) - {"CAP_SYS_RESOURCE"}
    sc = cri.LinuxContainerSecurityContext(privileged=True)
    assert "CAP_SYS_RESOURCE" not in spec._capabilities(sc, held)
    sc = cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["ALL"]))
    assert "CAP_SYS_RESOURCE" not in spec._capabilities(sc, held)
    sc = cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["SYS_RESOURCE"]))
    with pytest.raises(errors.InvalidArgument, match="CAP_SYS_RESOURCE is not available"):
        spec._capabilities(sc, held)
