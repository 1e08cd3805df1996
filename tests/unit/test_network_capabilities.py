"""CNI_ARGS and runtimeConfig built from a pod."""

from __future__ import annotations

import pytest

from shimd.errors import InvalidArgument
from shimd.network import capabilities as caps
from shimd.network.model import DnsSettings, PodNetworkRequest, PortMapping


def pod(**kw: object) -> PodNetworkRequest:
    base: dict[str, object] = {"pod_id": "abc", "name": "web", "namespace": "prod", "uid": "u-1", "netns_path": "/n"}
    base.update(kw)
    return PodNetworkRequest(**base)  # type: ignore[arg-type]


def test_cni_args() -> None:
    assert caps.cni_args(pod()) == ("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;"
                                    "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1")


def test_runtime_config_full() -> None:
    rc = caps.runtime_config(pod(
        port_mappings=[PortMapping("TCP", 80, 8080), PortMapping("udp", 53, 5353, "127.0.0.1"),
                       PortMapping("tcp", 9000, 0)],
        annotations={caps.INGRESS_BANDWIDTH: "10M", caps.EGRESS_BANDWIDTH: "1Gi", caps.IPS_ANNOTATION: "10.1.0.9"},
        cgroup_parent="/kubepods/pod-u-1",
        dns=DnsSettings(servers=["10.96.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]),
    ))
    assert rc["portMappings"] == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
    ]
    assert rc["bandwidth"] == {"ingressRate": 10_000_000, "ingressBurst": caps.UNLIMITED_BURST,
                               "egressRate": 2**30, "egressBurst": caps.UNLIMITED_BURST}
    assert rc["dns"] == {"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]}
    assert rc["ips"] == ["10.1.0.9"] and rc["cgroupPath"] == "/kubepods/pod-u-1"


def test_runtime_config_minimal() -> None:
    assert caps.runtime_config(pod(dns=DnsSettings())) == {"portMappings": []}


@pytest.mark.parametrize(("value", "expected"), [("1k", 1000), ("1.5M", 1_500_000), ("2Mi", 2 * 2**20),
                                                 ("1000", 1000), ("1P", 10**15)])
def test_quantities(value: str, expected: int) -> None:
    assert caps.parse_quantity(value, "f") == expected


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"annotations": {caps.INGRESS_BANDWIDTH: "fast"}}, "ingress-bandwidth"),
        ({"annotations": {caps.EGRESS_BANDWIDTH: "10"}}, "egress-bandwidth"),  # below 1k
        ({"annotations": {caps.EGRESS_BANDWIDTH: "2P"}}, "egress-bandwidth"),
        ({"annotations": {caps.IPS_ANNOTATION: "10.1.0.300"}}, "shimd.io/ips"),
        ({"port_mappings": [PortMapping("icmp", 1, 2)]}, r"port_mappings\[0\].protocol"),
        ({"port_mappings": [PortMapping("tcp", 1, 70000)]}, r"port_mappings\[0\]"),
        ({"port_mappings": [PortMapping("tcp", 1, 2, "nope")]}, "host_ip"),
        ({"dns": DnsSettings(servers=["not-an-ip"])}, r"dns_config.servers\[0\]"),
    ],
)
def test_runtime_config_rejects(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        caps.runtime_config(pod(**kw))
