"""What a pod tells its CNI plugins: CNI_ARGS and the runtimeConfig capability arguments.

Built the way kubelet's runtimes (containerd, CRI-O) build them, so existing CNI configs behave
the same under shimd.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from shimd.errors import InvalidArgument
from shimd.network.files import validate_dns
from shimd.network.model import PodNetworkRequest

INGRESS_BANDWIDTH = "kubernetes.io/ingress-bandwidth"
EGRESS_BANDWIDTH = "kubernetes.io/egress-bandwidth"
# Static pod IPs for the "ips" capability (comma-separated); no Kubernetes-wide annotation exists.
IPS_ANNOTATION = "shimd.io/ips"
PROTOCOLS = ("tcp", "udp", "sctp")
# kubelet's own bounds on the bandwidth annotations (1 kbit/s .. 1 Pbit/s).
MIN_RATE, MAX_RATE = 1_000, 10**15
# "Unlimited" burst, as containerd passes it.
UNLIMITED_BURST = 2**32 - 1

_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")


def cni_args(pod: PodNetworkRequest) -> str:
    return ";".join([
        "IgnoreUnknown=1",
        f"K8S_POD_NAMESPACE={pod.namespace}",
        f"K8S_POD_NAME={pod.name}",
        f"K8S_POD_INFRA_CONTAINER_ID={pod.pod_id}",
        f"K8S_POD_UID={pod.uid}",
    ])


def parse_quantity(value: str, field: str) -> int:
    """A Kubernetes resource quantity ("10M", "1Gi", "500k") as an integer."""
    m = _QUANTITY.match(value.strip())
    if not m or m.group(2) not in _SUFFIXES:
        raise InvalidArgument(f"annotation {field}: {value!r} is not a quantity such as 10M or 1Gi")
    try:
        return int(Decimal(m.group(1)) * _SUFFIXES[m.group(2)])
    except InvalidOperation:
        raise InvalidArgument(f"annotation {field}: {value!r} is not a quantity") from None


def _rate(annotations: dict[str, str], key: str) -> int | None:
    if key not in annotations:
        return None
    rate = parse_quantity(annotations[key], key)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(f"annotation {key}: {annotations[key]!r} must be between 1k and 1P bits per second")
    return rate


def bandwidth(annotations: dict[str, str]) -> dict[str, int] | None:
    ingress, egress = _rate(annotations, INGRESS_BANDWIDTH), _rate(annotations, EGRESS_BANDWIDTH)
    if ingress is None and egress is None:
        return None
    out: dict[str, int] = {}
    if ingress is not None:
        out.update(ingressRate=ingress, ingressBurst=UNLIMITED_BURST)
    if egress is not None:
        out.update(egressRate=egress, egressBurst=UNLIMITED_BURST)
    return out


def port_mappings(pod: PodNetworkRequest) -> list[dict[str, Any]]:
    out = []
    for i, pm in enumerate(pod.port_mappings):
        # containerPort-only entries are documentation; only host ports need the portmap plugin.
        if pm.host_port <= 0:
            continue
        proto = (pm.protocol or "tcp").lower()
        if proto not in PROTOCOLS:
            raise InvalidArgument(f"port_mappings[{i}].protocol: {pm.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if not (0 < pm.container_port <= 65535 and pm.host_port <= 65535):
            raise InvalidArgument(f"port_mappings[{i}]: ports must be in 1..65535 "
                                  f"(container {pm.container_port}, host {pm.host_port})")
        if pm.host_ip:
            try:
                ipaddress.ip_address(pm.host_ip)
            except ValueError:
                raise InvalidArgument(f"port_mappings[{i}].host_ip: {pm.host_ip!r} is not an IP address") from None
        entry: dict[str, Any] = {"hostPort": pm.host_port, "containerPort": pm.container_port, "protocol": proto}
        if pm.host_ip:
            entry["hostIP"] = pm.host_ip
        out.append(entry)
    return out


def static_ips(annotations: dict[str, str]) -> list[str]:
    raw = annotations.get(IPS_ANNOTATION, "")
    ips = [s.strip() for s in raw.split(",") if s.strip()]
    for ip in ips:
        try:
            ipaddress.ip_interface(ip)
        except ValueError:
            raise InvalidArgument(f"annotation {IPS_ANNOTATION}: {ip!r} is not an IP address") from None
    return ips


def runtime_config(pod: PodNetworkRequest) -> dict[str, Any]:
    """Every capability argument shimd can provide; each plugin receives those it declares."""
    rc: dict[str, Any] = {"portMappings": port_mappings(pod)}
    bw = bandwidth(pod.annotations)
    if bw is not None:
        rc["bandwidth"] = bw
    if pod.dns is not None and not pod.dns.empty():
        validate_dns(pod.dns)
        rc["dns"] = {"servers": list(pod.dns.servers), "searches": list(pod.dns.searches),
                     "options": list(pod.dns.options)}
    ips = static_ips(pod.annotations)
    if ips:
        rc["ips"] = ips
    if pod.cgroup_parent:
        rc["cgroupPath"] = pod.cgroup_parent
    return rc
