"""CRI requests with most of their fields set, built with the grpcio messages, for codec tests."""

from __future__ import annotations

from typing import Any


def pod_config(pb: Any) -> Any:
    """A PodSandboxConfig with most fields set (pb: the grpcio message module)."""
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", namespace="default", uid="u-1", attempt=3),
        hostname="web", log_directory="/var/log/pods/x",
        dns_config=pb.DNSConfig(servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]),
        port_mappings=[pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1")],
        labels={"app": "web", "empty": ""}, annotations={"a/b": "c" * 300},
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/pod-u-1", sysctls={"net.ipv4.ip_forward": "1"},
            overhead=pb.LinuxContainerResources(cpu_shares=2),
            resources=pb.LinuxContainerResources(cpu_period=100000, cpu_quota=-1, memory_limit_in_bytes=1 << 40,
                                                 unified={"memory.high": "max"},
                                                 hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4)]),
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.POD, ipc=pb.NODE,
                                                     userns_options=pb.UserNamespace(
                                                         mode=pb.POD, uids=[pb.IDMapping(host_id=65536, length=65536)],
                                                         gids=[pb.IDMapping(host_id=65536, length=65536)])),
                run_as_user=pb.Int64Value(value=0), run_as_group=pb.Int64Value(value=0),
                supplemental_groups=[1, 2, 2**40], readonly_rootfs=True, privileged=True,
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="/p.json"))))


def create_request(pb: Any) -> Any:
    """A CreateContainerRequest with most fields set."""
    return pb.CreateContainerRequest(
        pod_sandbox_id="f" * 64, sandbox_config=pod_config(pb),
        config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="c", attempt=1),
            image=pb.ImageSpec(image="busybox", annotations={"x": "y"}),
            command=["sh"], args=["-c", "echo ✓"], working_dir="/w",
            envs=[pb.KeyValue(key="A", value=b"1"), pb.KeyValue(key="B", value=b"\xff")],
            mounts=[pb.Mount(container_path="/d", host_path="/tmp", readonly=True, recursive_read_only=True,
                             propagation=pb.PROPAGATION_HOST_TO_CONTAINER, image=pb.ImageSpec(image="img"))],
            devices=[pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwm")],
            labels={"l": "v"}, annotations={"k": "v"}, log_path="c.log", stdin=True, stdin_once=True, tty=True,
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(cpu_shares=1024, oom_score_adj=-997, cpuset_cpus="0-1",
                                                     memory_swap_limit_in_bytes=-1),
                security_context=pb.LinuxContainerSecurityContext(
                    capabilities=pb.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]),
                    run_as_username="nobody", masked_paths=["/proc/kcore"], no_new_privs=True,
                    apparmor=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault))),
            CDI_devices=[pb.CDIDevice(name="vendor.com/gpu=0")]))
