"""Plain data passed between the pod layer and the network layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PortMapping:
    protocol: str  # "tcp" | "udp" | "sctp"
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass
class DnsSettings:
    servers: list[str] = field(default_factory=list)
    searches: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.servers or self.searches or self.options)


@dataclass
class PodNetworkRequest:
    pod_id: str
    name: str
    namespace: str
    uid: str
    netns_path: str
    port_mappings: list[PortMapping] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    dns: DnsSettings | None = None


@dataclass
class PodNetworkResult:
    ip: str
    additional_ips: list[str]
    raw: dict[str, Any]  # the final CNI result


@dataclass
class PreparedNetwork:
    """A pod's network between NetworkManager.prepare (checked, record saved) and add (the ADD chain)."""

    pod_id: str
    network: Any  # cni.NetworkList: the configuration the record holds
    record: dict[str, Any]
    path: Path
