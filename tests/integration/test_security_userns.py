"""User namespaces (hostUsers: false).

shimd pins a pod's network/IPC namespaces (and the pause PID namespace) from the host's user
namespace; the kernel refuses to mount proc, mqueue and sysfs for them from inside a new user
namespace, so runc would fail at start. shimd refuses such a container at create instead, clearly
and without leaving anything behind.
"""

from __future__ import annotations

import grpc
import pytest

from tests.support.runtime import Runtime


def test_user_namespace_refused_cleanly(rt: Runtime) -> None:
    pb = rt.pb
    userns = pb.UserNamespace(mode=pb.POD, uids=[pb.IDMapping(host_id=200000, container_id=0, length=65536)],
                              gids=[pb.IDMapping(host_id=200000, container_id=0, length=65536)])
    ns = pb.NamespaceOption(pid=pb.CONTAINER, userns_options=userns)
    pod_id, pod_cfg = rt.run_pod("userns")
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "c", ["sleep", "60"], linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(namespace_options=ns)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "userns_options" in e.value.details()
    assert rt.client.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    # Malformed mappings name the field too.
    ns.userns_options.gids.pop()
    with pytest.raises(grpc.RpcError) as e:
        rt.create(pod_id, pod_cfg, "c", ["true"], linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(namespace_options=ns)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "userns_options.gids" in e.value.details()
