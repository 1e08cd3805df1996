from pathlib import Path

import pytest

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.oci import spec


def _pod(**kw) -> spec.PodContext:  # type: ignore[no-untyped-def]
    base = dict(pod_id="p" * 64, name="pod", namespace="ns", uid="u", hostname="pod",
                namespaces={"network": "/run/ns/net", "ipc": "/run/ns/ipc", "uts": "/run/ns/uts"},
                files={"/etc/hosts": "/run/p/hosts"}, cgroups_path="/shimd/podx/c")
    base.update(kw)
    return spec.PodContext(**base)


def _image(tmp_path: Path, cfg: dict | None = None) -> spec.ImageContext:
    etc = tmp_path / "layer" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1000:\nwheel:x:10:app\n")
    return spec.ImageContext(name="img", config=cfg or {"Cmd": ["sh"], "Env": ["PATH=/bin", "A=img"]},
                             layers=[str(tmp_path / "layer")])


def _cfg(**kw) -> cri.ContainerConfig:  # type: ignore[no-untyped-def]
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="img"), **kw)


@pytest.mark.parametrize(
    ("image", "command", "args", "want"),
    [
        ({"Entrypoint": ["/ep"], "Cmd": ["c1"]}, [], [], ["/ep", "c1"]),
        ({"Entrypoint": ["/ep"], "Cmd": ["c1"]}, ["/cmd"], [], ["/cmd"]),
        ({"Entrypoint": ["/ep"], "Cmd": ["c1"]}, [], ["a1"], ["/ep", "a1"]),
        ({"Entrypoint": ["/ep"], "Cmd": ["c1"]}, ["/cmd"], ["a1"], ["/cmd", "a1"]),
        ({"Cmd": ["sh"]}, [], [], ["sh"]),
    ],
)
def test_process_args_follow_kubelet_rules(image: dict, command: list, args: list, want: list) -> None:
    assert spec.process_args(_cfg(command=command, args=args), image) == want


def test_no_command_anywhere_is_invalid() -> None:
    with pytest.raises(errors.InvalidArgument, match="command"):
        spec.process_args(_cfg(), {})


def test_env_merge_and_defaults(tmp_path: Path) -> None:
    s = spec.container_spec("c" * 64, _cfg(envs=[cri.KeyValue(key="A", value=b"cfg")]), _pod(), _image(tmp_path),
                            "/rootfs", min_oom=0)
    env = s["process"]["env"]
    assert "A=cfg" in env and "A=img" not in env and "PATH=/bin" in env
    assert s["hostname"] == "pod"
    kinds = {n["type"]: n.get("path") for n in s["linux"]["namespaces"]}
    assert kinds["network"] == "/run/ns/net" and kinds["pid"] is None
    assert s["process"]["capabilities"]["bounding"] == spec.DEFAULT_CAPS
    assert s["linux"]["cgroupsPath"] == "/shimd/podx/c"
    assert {"destination": "/etc/hosts", "type": "bind", "source": "/run/p/hosts",
            "options": ["rbind", "rprivate"]} in s["mounts"]


def test_users(tmp_path: Path) -> None:
    img = _image(tmp_path)
    assert spec.resolve_user(cri.LinuxContainerSecurityContext(), "", img.layers) == {"uid": 0, "gid": 0,
                                                                                     "additionalGids": [0]}
    assert spec.resolve_user(cri.LinuxContainerSecurityContext(), "app", img.layers) == {
        "uid": 1000, "gid": 1000, "additionalGids": [1000, 10]}
    sc = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=1000),
                                           run_as_group=cri.Int64Value(value=5), supplemental_groups=[7])
    # Like containerd, the groups the uid belongs to in /etc/group are added too.
    assert spec.resolve_user(sc, "", img.layers) == {"uid": 1000, "gid": 5, "additionalGids": [5, 7, 10]}
    sc0 = cri.LinuxContainerSecurityContext(run_as_user=cri.Int64Value(value=0))
    assert spec.resolve_user(sc0, "app", img.layers)["uid"] == 0
    with pytest.raises(errors.InvalidArgument, match="nobody2"):
        spec.resolve_user(cri.LinuxContainerSecurityContext(run_as_username="nobody2"), "", img.layers)


def test_capabilities() -> None:
    sc = cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["NET_ADMIN"],
                                                                       drop_capabilities=["KILL"]))
    caps = spec._capabilities(sc)
    assert "CAP_NET_ADMIN" in caps and "CAP_KILL" not in caps
    sc = cri.LinuxContainerSecurityContext(capabilities=cri.Capability(drop_capabilities=["ALL"],
                                                                       add_capabilities=["CHOWN"]))
    assert spec._capabilities(sc) == ["CAP_CHOWN"]
    with pytest.raises(errors.InvalidArgument, match="CAP_BOGUS"):
        spec._capabilities(cri.LinuxContainerSecurityContext(capabilities=cri.Capability(add_capabilities=["BOGUS"])))


def test_resources_and_oom_clamp() -> None:
    res, oom = spec.resources(cri.LinuxContainerResources(cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                                                          memory_limit_in_bytes=64 << 20, oom_score_adj=-998), 0)
    assert res == {"cpu": {"shares": 512, "quota": 50000, "period": 100000}, "memory": {"limit": 64 << 20}}
    assert oom == 0
    with pytest.raises(errors.InvalidArgument, match="memory_limit_in_bytes"):
        spec.resources(cri.LinuxContainerResources(memory_limit_in_bytes=-5), 0)
    with pytest.raises(errors.InvalidArgument, match="oom_score_adj"):
        spec.resources(cri.LinuxContainerResources(oom_score_adj=5000), 0)


def test_user_mount_overrides_default(tmp_path: Path) -> None:
    cfg = _cfg(mounts=[cri.Mount(container_path="/etc/hosts", host_path="/tmp/h", readonly=True,
                                 propagation=cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER)])
    s = spec.container_spec("c" * 64, cfg, _pod(), _image(tmp_path), "/rootfs", min_oom=0)
    hosts = [m for m in s["mounts"] if m["destination"] == "/etc/hosts"]
    assert hosts == [{"destination": "/etc/hosts", "type": "bind", "source": "/tmp/h",
                      "options": ["rbind", "rslave", "ro"]}]
    with pytest.raises(errors.InvalidArgument, match=r"mounts\[0\].container_path"):
        spec.container_spec("c" * 64, _cfg(mounts=[cri.Mount(container_path="rel", host_path="/x")]), _pod(),
                            _image(tmp_path), "/rootfs", min_oom=0)


def test_privileged_needs_privileged_pod(tmp_path: Path) -> None:
    cfg = _cfg(linux=cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(privileged=True)))
    with pytest.raises(errors.InvalidArgument, match="privileged"):
        spec.container_spec("c" * 64, cfg, _pod(), _image(tmp_path), "/rootfs", min_oom=0)
    s = spec.container_spec("c" * 64, cfg, _pod(privileged_pod=True), _image(tmp_path), "/rootfs", min_oom=0)
    # All capabilities shimd itself may hold (hosts can drop some, e.g. CAP_SYS_RESOURCE here).
    assert s["process"]["capabilities"]["bounding"] == [c for c in spec.ALL_CAPS if c in spec.host_caps()]
    assert "maskedPaths" not in s["linux"]
