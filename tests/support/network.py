"""Fixtures for namespace and CNI tests: private pin directories, private CNI networks (own bridge,
subnet, IPAM store and conf dir), all cleaned up even on failure."""

from __future__ import annotations

import ipaddress
import json
import random
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shimd import config
from shimd.network import defaults, namespaces
from shimd.network.manager import NetworkManager

CNI_BIN_DIRS = ["/usr/lib/cni"]


@pytest.fixture
def ns_base() -> Iterator[Path]:
    """A private namespace pin directory; every pin and the base bind mount are removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="shimd-ns-"))
    try:
        yield base
    finally:
        namespaces.release_base_dir(base)
        shutil.rmtree(base, ignore_errors=True)


def _used_subnets() -> set[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    return {str(ipaddress.ip_interface(f.split()[3]).network) for f in out.splitlines() if len(f.split()) > 3}


def nat_rules(tool: str = "iptables-save") -> list[str]:
    """`iptables-save -t nat` without counters and comments, one rule or chain per line."""
    out = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, timeout=20).stdout
    return [line.split(" [")[0] for line in out.splitlines() if line and not line.startswith("#")]


def rules_of(network: str, rules: list[str]) -> tuple[list[str], set[str]]:
    """Rules whose CNI comment names `network`, and the chains they jump to."""
    mine = [r for r in rules if f'name: \\"{network}\\"' in r]
    chains = {r.split(" -j ")[1].split()[0] for r in mine if " -j " in r and r.split(" -j ")[1].startswith("CNI-")}
    return mine, chains


@dataclass
class CniNetwork:
    """A CNI network private to one test."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    root: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def ns_dir(self) -> Path:
        return self.root / "ns"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def ip(self, n: int) -> str:
        return str(self.subnet.network_address + n)

    def conflist(self) -> dict[str, Any]:
        return defaults.conflist(name=self.name, bridge=self.bridge, subnet=str(self.subnet),
                                 data_dir=str(self.ipam_dir))

    def write(self, conf: dict[str, Any] | None = None, filename: str = "10-test.conflist") -> Path:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        path = self.conf_dir / filename
        path.write_text(json.dumps(conf if conf is not None else self.conflist()))
        return path

    def cni_config(self) -> config.CniConfig:
        return config.CniConfig(conf_dir=str(self.conf_dir), bin_dirs=list(CNI_BIN_DIRS))

    def manager(self) -> NetworkManager:
        return NetworkManager(self.cni_config(), self.state_dir)

    def allocations(self) -> list[str]:
        """host-local's allocation files (one per leased IP); its lock and cursor files are not leases."""
        d = self.ipam_dir / self.name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name != "lock" and not p.name.startswith("last_reserved_ip"))

    def cleanup(self) -> None:
        namespaces.release_base_dir(self.ns_dir)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)
        _remove_nat_rules(self.name)
        shutil.rmtree(self.root, ignore_errors=True)


def _remove_nat_rules(network: str) -> None:
    """Safety net for failed tests: delete rules naming our network and the chains they used."""
    for tool in ("iptables", "ip6tables"):
        mine, chains = rules_of(network, nat_rules(f"{tool}-save"))
        for rule in mine:
            args = shlex.split(rule)
            if args and args[0] == "-A":
                subprocess.run([tool, "-w", "-t", "nat", "-D", *args[1:]], capture_output=True, timeout=20)
        for chain in chains:
            if chain.startswith("CNI-HOSTPORT-"):
                continue  # portmap's shared chains; other CNI users on this host may rely on them
            subprocess.run([tool, "-w", "-t", "nat", "-F", chain], capture_output=True, timeout=20)
            subprocess.run([tool, "-w", "-t", "nat", "-X", chain], capture_output=True, timeout=20)


@pytest.fixture
def cni_network() -> Iterator[CniNetwork]:
    """A unique bridge name, a free 10.123.x.0/24 subnet and private conf/IPAM/state/netns dirs."""
    used = _used_subnets()
    free = [x for x in range(256) if f"10.123.{x}.0/24" not in used]
    x = random.choice(free)
    tag = f"{random.getrandbits(24):06x}"
    net = CniNetwork(name=f"shimdtest-{tag}", bridge=f"shtst{tag}", subnet=ipaddress.IPv4Network(f"10.123.{x}.0/24"),
                     root=Path(tempfile.mkdtemp(prefix="shimd-cni-")))
    net.ns_dir.mkdir()
    try:
        yield net
    finally:
        net.cleanup()


# --- pods on a private CNI network through a real shimd (tests/integration/test_pod_network.py) ---------


def shimd_network_toml(registry_host: str, conf_dir: Path) -> str:
    """shimd config for pod-network tests: plain-HTTP registry, private CNI conf dir, and an
    ephemeral streaming port (the default 10010 collides with other shimd instances on the host)."""
    return (f'[registries.hosts."{registry_host}"]\ninsecure = true\n'
            f'[cni]\nconf_dir = "{conf_dir}"\nbin_dirs = {json.dumps(CNI_BIN_DIRS)}\n'
            '[streaming]\naddress = "127.0.0.1:0"\n')


@dataclass
class NetRuntime:
    """A started shimd (tests.support.runtime.Runtime) whose CNI conf dir is `net`'s."""

    rt: Any  # tests.support.runtime.Runtime
    net: CniNetwork


@pytest.fixture
def net_rt(shimd_factory: Any, busybox_registry: tuple[str, str], cni_network: CniNetwork) -> Iterator[NetRuntime]:
    """shimd with the bridge conflist of a private network (unique bridge, subnet, IPAM dir)."""
    from tests.support.runtime import Runtime, kill_strays

    host, ref = busybox_registry
    cni_network.write()
    proc = shimd_factory(shimd_network_toml(host, cni_network.conf_dir))
    runtime = Runtime(proc, ref)
    try:
        proc.start()
        runtime.client.images.PullImage(runtime.pb.PullImageRequest(image=runtime.pb.ImageSpec(image=ref)))
        yield NetRuntime(runtime, cni_network)
    finally:
        try:
            runtime.cleanup()
        finally:
            kill_strays(proc.base)
            namespaces.release_base_dir(proc.state / "ns")
