"""Contents of a pod's /etc/resolv.conf, /etc/hosts and /etc/hostname, and validation of their inputs.

Pure functions except for reading the host's own files (small, local) when a pod shares them;
callers write the results with shimd.fsutil from a worker thread.
"""

from __future__ import annotations

import ipaddress
import re

from shimd.errors import InvalidArgument
from shimd.network.model import DnsSettings

HOST_RESOLV_CONF = "/etc/resolv.conf"
HOST_HOSTS = "/etc/hosts"
HOSTNAME_MAX = 64  # kernel limit for a UTS hostname
# Limits kubelet itself enforces on a pod's DNS config.
MAX_SEARCHES = 32
MAX_SEARCH_CHARS = 2048
MAX_SERVERS = 3

_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

_HOSTS_HEADER = (
    "# Kubernetes-managed hosts file (written by shimd).\n"
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "fe00::0\tip6-mcastprefix\n"
    "fe00::1\tip6-allnodes\n"
    "fe00::2\tip6-allrouters\n"
)


def _is_domain(name: str, max_len: int = 253) -> bool:
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= max_len and all(_LABEL.match(label) for label in name.split("."))


def is_hostname_label(name: str) -> bool:
    """One RFC 1123 label (at most 63 letters, digits and inner hyphens)."""
    return bool(_LABEL.match(name))


def validate_hostname(hostname: str, field: str = "hostname") -> None:
    """A pod hostname: DNS labels separated by dots, at most 64 bytes (the kernel's UTS limit)."""
    if len(hostname) > HOSTNAME_MAX or not _is_domain(hostname, HOSTNAME_MAX) or hostname.endswith("."):
        raise InvalidArgument(f"{field}: {hostname!r} is not a valid hostname "
                              f"(RFC 1123 labels, at most {HOSTNAME_MAX} characters)")


def validate_dns(dns: DnsSettings, field: str = "dns_config") -> None:
    if len(dns.servers) > MAX_SERVERS:
        raise InvalidArgument(f"{field}.servers: at most {MAX_SERVERS} nameservers, got {len(dns.servers)}")
    for i, server in enumerate(dns.servers):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"{field}.servers[{i}]: {server!r} is not an IP address") from None
    if len(dns.searches) > MAX_SEARCHES or len(" ".join(dns.searches)) > MAX_SEARCH_CHARS:
        raise InvalidArgument(f"{field}.searches: at most {MAX_SEARCHES} domains and {MAX_SEARCH_CHARS} characters")
    for i, search in enumerate(dns.searches):
        if not _is_domain(search):
            raise InvalidArgument(f"{field}.searches[{i}]: {search!r} is not a valid domain name")
    for i, option in enumerate(dns.options):
        if not option or any(c.isspace() for c in option):
            raise InvalidArgument(f"{field}.options[{i}]: {option!r} must be one non-empty word")


def _read_host(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def resolv_conf(dns: DnsSettings | None, host_network: bool) -> str:
    """The pod's resolv.conf: exactly the given DNS settings, or the host's file when none are given.

    kubelet always sends a DNSConfig message; an all-empty one means "use the host's", as in
    containerd and CRI-O. host_network does not change this: kubelet has already decided.
    """
    del host_network  # kept in the signature: kubelet, not the runtime, chooses per dnsPolicy
    if dns is None or dns.empty():
        return _read_host(HOST_RESOLV_CONF)
    validate_dns(dns)
    lines = []
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    lines.extend(f"nameserver {s}" for s in dns.servers)
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def hosts_file(ip: str | None, hostname: str, host_network: bool) -> str:
    """Host network pods see the host's /etc/hosts; others get localhost entries plus their own name."""
    if host_network:
        return _read_host(HOST_HOSTS)
    validate_hostname(hostname)
    text = _HOSTS_HEADER
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidArgument(f"pod ip: {ip!r} is not an IP address") from None
        text += f"{ip}\t{hostname}\n"
    return text


def hostname_file(hostname: str) -> str:
    validate_hostname(hostname)
    return hostname + "\n"
