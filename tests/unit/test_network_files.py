"""resolv.conf, hosts and hostname contents, and their validation."""

from __future__ import annotations

import pytest

from shimd.errors import InvalidArgument
from shimd.network import files
from shimd.network.model import DnsSettings


def test_resolv_conf_from_dns_config() -> None:
    dns = DnsSettings(servers=["10.96.0.10", "fd00::10"], searches=["ns.svc.cluster.local", "cluster.local"],
                      options=["ndots:5", "edns0"])
    assert files.resolv_conf(dns, host_network=False) == (
        "search ns.svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\nnameserver fd00::10\n"
        "options ndots:5 edns0\n"
    )
    assert files.resolv_conf(DnsSettings(servers=["1.1.1.1"]), False) == "nameserver 1.1.1.1\n"


def test_resolv_conf_defaults_to_host(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    host = tmp_path / "resolv.conf"  # type: ignore[operator]
    host.write_text("nameserver 192.0.2.53\n")
    monkeypatch.setattr(files, "HOST_RESOLV_CONF", str(host))
    assert files.resolv_conf(None, False) == "nameserver 192.0.2.53\n"
    assert files.resolv_conf(DnsSettings(), True) == "nameserver 192.0.2.53\n"


@pytest.mark.parametrize(
    ("dns", "field"),
    [
        (DnsSettings(servers=["dns.example"]), r"dns_config.servers\[0\]"),
        (DnsSettings(servers=["1.1.1.1"] * 4), "dns_config.servers"),
        (DnsSettings(searches=["bad..domain"]), r"dns_config.searches\[0\]"),
        (DnsSettings(searches=[f"d{i}.x" for i in range(33)]), "dns_config.searches"),
        (DnsSettings(options=["two words"]), r"dns_config.options\[0\]"),
    ],
)
def test_resolv_conf_rejects(dns: DnsSettings, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        files.resolv_conf(dns, False)


def test_hosts_file() -> None:
    text = files.hosts_file("10.88.0.5", "web-0", host_network=False)
    assert text.startswith("# Kubernetes-managed hosts file")
    assert "127.0.0.1\tlocalhost\n" in text and "::1\tlocalhost" in text
    assert text.endswith("10.88.0.5\tweb-0\n")
    assert "web-0" not in files.hosts_file(None, "web-0", False)


def test_hosts_file_host_network(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    host = tmp_path / "hosts"  # type: ignore[operator]
    host.write_text("127.0.0.1 localhost myhost\n")
    monkeypatch.setattr(files, "HOST_HOSTS", str(host))
    assert files.hosts_file("10.0.0.1", "ignored", host_network=True) == "127.0.0.1 localhost myhost\n"


def test_hostname_validation() -> None:
    assert files.hostname_file("web-0.sub") == "web-0.sub\n"
    for bad in ("", "-web", "web_0", "a" * 65, "web.", "we b"):
        with pytest.raises(InvalidArgument, match="hostname"):
            files.hostname_file(bad)
    with pytest.raises(InvalidArgument, match="pod ip"):
        files.hosts_file("nope", "web", False)
