"""Pod networking end to end: real CNI plugins on a private bridge, real runc containers, driven
through the independent grpcio CRI client (issue 4)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.support.network import CNI_BIN_DIRS, NetRuntime, nat_rules, rules_of
from tests.support.registry import free_port

HTTPD_PORT = 8080


def exec_sync(nr: NetRuntime, cid: str, cmd: list[str], timeout: int = 10) -> Any:
    rt = nr.rt
    return rt.client.runtime.ExecSync(rt.pb.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout))


def pod_ip(nr: NetRuntime, pod_id: str) -> tuple[str, list[str]]:
    rt = nr.rt
    st = rt.client.runtime.PodSandboxStatus(rt.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    return st.network.ip, [a.ip for a in st.network.additional_ips]


def running(nr: NetRuntime, pod_id: str, pod_cfg: Any, name: str, command: list[str]) -> str:
    rt = nr.rt
    cid = rt.create(pod_id, pod_cfg, name, command)
    rt.start(cid)
    rt.wait_state(cid, rt.pb.CONTAINER_RUNNING)
    return cid


def host_address() -> str:
    """A non-loopback address of this host (where host ports are published)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.254", 9))  # no packet is sent; only picks the source address
        return str(s.getsockname()[0])


def http_get(host: str, port: int, path: str, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                chunks = []
                while data := s.recv(65536):
                    chunks.append(data)
                return b"".join(chunks)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_two_pods_talk_and_host_port(net_rt: NetRuntime) -> None:
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    hport = free_port()
    a_id, a_cfg = rt.run_pod("web-a", port_mappings=[
        pb.PortMapping(protocol=pb.TCP, container_port=HTTPD_PORT, host_port=hport)])
    b_id, b_cfg = rt.run_pod("client-b", hostname="client-b", dns_config=pb.DNSConfig(
        servers=["10.0.0.10", "10.0.0.11"], searches=["ns1.svc.cluster.local", "cluster.local"],
        options=["ndots:5", "timeout:2"]))
    a_ip, a_more = pod_ip(nr, a_id)
    b_ip, _ = pod_ip(nr, b_id)
    assert ipaddress.ip_address(a_ip) in nr.net.subnet and ipaddress.ip_address(b_ip) in nr.net.subnet
    assert a_ip != b_ip and a_more == []

    web = running(nr, a_id, a_cfg, "httpd", ["sh", "-c", "mkdir -p /www && echo hello-from-a > /www/index.html "
                                                         f"&& exec httpd -f -p {HTTPD_PORT} -h /www"])
    cli = running(nr, b_id, b_cfg, "client", ["sleep", "1000"])

    # B pings A and fetches A's page by IP.
    r = exec_sync(nr, cli, ["ping", "-c", "2", "-W", "2", a_ip])
    assert r.exit_code == 0, r.stdout + r.stderr
    r = exec_sync(nr, cli, ["sh", "-c", f"for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O- http://{a_ip}:{HTTPD_PORT}/ "
                                       "&& exit 0; sleep 0.3; done; exit 1"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == b"hello-from-a\n"
    # A reaches B back (ICMP), then the host reaches A through the host port.
    assert exec_sync(nr, web, ["ping", "-c", "1", "-W", "2", b_ip]).exit_code == 0
    assert b"hello-from-a" in http_get(host_address(), hport, "/")
    assert b"hello-from-a" in http_get("127.0.0.1", hport, "/")  # portmap's snat: localhost too

    # DNS, hosts and hostname inside B.
    r = exec_sync(nr, cli, ["cat", "/etc/resolv.conf"])
    assert r.stdout.decode().splitlines() == [
        "search ns1.svc.cluster.local cluster.local", "nameserver 10.0.0.10", "nameserver 10.0.0.11",
        "options ndots:5 timeout:2"]
    hosts = exec_sync(nr, cli, ["cat", "/etc/hosts"]).stdout.decode()
    assert f"{b_ip}\tclient-b" in hosts.splitlines() and "127.0.0.1\tlocalhost" in hosts
    assert exec_sync(nr, cli, ["hostname"]).stdout == b"client-b\n"
    assert exec_sync(nr, cli, ["cat", "/etc/hostname"]).stdout == b"client-b\n"
    # Every container of the pod shares them (and the pod's network namespace).
    side = running(nr, b_id, b_cfg, "sidecar", ["sleep", "1000"])
    for path in ("/etc/resolv.conf", "/etc/hosts", "/etc/hostname"):
        assert exec_sync(nr, side, ["cat", path]).stdout == exec_sync(nr, cli, ["cat", path]).stdout, path
    assert f"inet {b_ip}/" in exec_sync(nr, side, ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.decode()
    # A without DNSConfig has the host's resolv.conf, and its metadata name as hostname.
    with open("/etc/resolv.conf", "rb") as f:
        assert exec_sync(nr, web, ["cat", "/etc/resolv.conf"]).stdout == f.read()
    assert exec_sync(nr, web, ["hostname"]).stdout == b"web-a\n"
    # Only B's own interface and lo in B's namespace.
    links = exec_sync(nr, cli, ["ip", "-o", "link"]).stdout.decode()
    assert {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()} == {"lo", "eth0"}


# --- helpers for leftover checks -------------------------------------------------------------------------


def write_conf(nr: NetRuntime, conf: dict[str, Any] | str, filename: str = "10-test.conflist") -> None:
    """Replace a config file atomically (a new inode, so shimd notices even within one mtime tick)."""
    nr.net.conf_dir.mkdir(parents=True, exist_ok=True)
    tmp = nr.net.conf_dir / f".{filename}.tmp"
    tmp.write_text(conf if isinstance(conf, str) else json.dumps(conf))
    os.replace(tmp, nr.net.conf_dir / filename)


def network_condition(nr: NetRuntime) -> Any:
    rt = nr.rt
    conds = rt.client.runtime.Status(rt.pb.StatusRequest()).status.conditions
    return next(c for c in conds if c.type == "NetworkReady")


def our_rules(nr: NetRuntime) -> tuple[list[str], set[str]]:
    """nat rules naming our network (bridge ipMasq and portmap comments) and the CNI chains they use."""
    return rules_of(nr.net.name, nat_rules())


def declared_chains() -> set[str]:
    return {line[1:].split()[0] for line in nat_rules() if line.startswith(":")}


@dataclass
class Snapshot:
    allocations: list[str]
    pins: list[str]
    records: list[str]
    rules: list[str]
    links: set[str]
    pods: list[str]
    state: list[str]


def snapshot(nr: NetRuntime) -> Snapshot:
    rt = nr.rt
    ns_dir, rec_dir = rt.proc.state / "ns", rt.proc.root / "network"
    pods = rt.client.runtime.ListPodSandbox(rt.pb.ListPodSandboxRequest()).items
    return Snapshot(
        allocations=nr.net.allocations(),
        pins=sorted(p.name for p in ns_dir.iterdir()) if ns_dir.is_dir() else [],
        records=sorted(p.name for p in rec_dir.iterdir()) if rec_dir.is_dir() else [],
        rules=sorted(our_rules(nr)[0]),
        links=bridge_ports(nr),
        pods=sorted(p.id for p in pods),
        state=sorted(str(e) for d in (rt.proc.root / "pods", rt.proc.state / "pods") if d.is_dir()
                     for e in d.iterdir()),
    )


def bridge_ports(nr: NetRuntime) -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "master", nr.net.bridge], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def stop_remove(nr: NetRuntime, pod_id: str) -> None:
    rt = nr.rt
    rt.client.runtime.StopPodSandbox(rt.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    rt.client.runtime.RemovePodSandbox(rt.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def rpc_error(fn: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value


# --- readiness, config changes, CNI errors ---------------------------------------------------------------


def test_network_ready_follows_config_dir(net_rt: NetRuntime) -> None:
    nr, rt = net_rt, net_rt.rt
    assert network_condition(nr).status is True
    conf = nr.net.conf_dir / "10-test.conflist"
    os.rename(conf, nr.net.root / "aside.conflist")
    cond = network_condition(nr)
    assert cond.status is False and cond.reason == "NetworkPluginNotReady"
    assert str(nr.net.conf_dir) in cond.message
    err = rpc_error(rt.run_pod, "no-net")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and str(nr.net.conf_dir) in err.details()

    write_conf(nr, "{ not json")  # an invalid file: still not ready, and the reason says why
    cond = network_condition(nr)
    assert cond.status is False and "10-test.conflist" in cond.message and "JSON" in cond.message

    os.rename(nr.net.root / "aside.conflist", conf)  # picked up without a restart
    assert network_condition(nr).status is True
    pod_id, _ = rt.run_pod("after-fix")
    assert ipaddress.ip_address(pod_ip(nr, pod_id)[0]) in nr.net.subnet
    stop_remove(nr, pod_id)


def test_cni_errors_name_the_plugin_and_leave_nothing(net_rt: NetRuntime) -> None:
    nr, rt = net_rt, net_rt.rt
    before = snapshot(nr)
    good = nr.net.conflist()

    # A plugin binary that does not exist: not ready, and RunPodSandbox fails before any ADD.
    missing = {**good, "plugins": [*good["plugins"], {"type": "shimd-no-such-plugin"}]}
    write_conf(nr, missing)
    cond = network_condition(nr)
    assert cond.status is False and "shimd-no-such-plugin" in cond.message
    err = rpc_error(rt.run_pod, "missing")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "shimd-no-such-plugin" in err.details()
    assert snapshot(nr) == before

    # A plugin failing half way through the chain, after bridge has taken an IP and made a veth.
    failing = {**good, "plugins": [good["plugins"][0],
                                   {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.shimd_no_such_sysctl": "1"}},
                                   *good["plugins"][1:]]}
    write_conf(nr, failing)
    assert network_condition(nr).status is True
    err = rpc_error(rt.run_pod, "midway")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "'tuning'" in err.details(), err.details()
    assert snapshot(nr) == before

    # A bad plugin configuration (bridge with an invalid subnet).
    bad = json.loads(json.dumps(good))
    bad["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.300.0.0/24"}]]
    write_conf(nr, bad)
    err = rpc_error(rt.run_pod, "badconf")
    assert "'bridge'" in err.details(), err.details()
    assert snapshot(nr) == before

    write_conf(nr, good)
    pod_id, _ = rt.run_pod("fine-again")
    stop_remove(nr, pod_id)
    assert snapshot(nr) == before


def test_ipam_exhausted(net_rt: NetRuntime) -> None:
    nr, rt = net_rt, net_rt.rt
    small = nr.net.conflist()
    small["plugins"][0]["ipam"]["ranges"] = [[{"subnet": str(nr.net.subnet), "rangeStart": nr.net.ip(10),
                                              "rangeEnd": nr.net.ip(13)}]]
    write_conf(nr, small)
    before = snapshot(nr)
    pods = [rt.run_pod(f"small-{i}")[0] for i in range(4)]
    assert sorted(pod_ip(nr, p)[0] for p in pods) == [nr.net.ip(n) for n in range(10, 14)]
    full = snapshot(nr)
    err = rpc_error(rt.run_pod, "one-too-many")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "'bridge'" in err.details() and "no IP addresses available" in err.details()
    assert snapshot(nr) == full  # the failed pod left no IP, pin, record, rule or veth
    # Freeing one address makes room again.
    stop_remove(nr, pods.pop())
    pods.append(rt.run_pod("fits-again")[0])
    for p in pods:
        stop_remove(nr, p)
    assert snapshot(nr) == before


# --- host network, pod CIDR, dual stack, capabilities ----------------------------------------------------


def test_host_network_pod(net_rt: NetRuntime) -> None:
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    before = snapshot(nr)
    host_ns = pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
        namespace_options=pb.NamespaceOption(network=pb.NODE)))
    p1, c1 = rt.run_pod("hostnet", linux=host_ns)
    p2, c2 = rt.run_pod("hostnet-dns", linux=host_ns, dns_config=pb.DNSConfig(servers=["10.0.0.10"]))
    assert pod_ip(nr, p1) == ("", [])
    mid = snapshot(nr)
    assert (mid.allocations, mid.records, mid.links) == (before.allocations, before.records, before.links)
    # No pinned network namespace for either pod.
    assert not any((rt.proc.state / "ns" / p / "network").exists() for p in (p1, p2))

    cid = running(nr, p1, c1, "look", ["sleep", "1000"])
    # A link made on the host right now shows up inside: the container is in the host's namespace.
    probe = f"{nr.net.bridge}x"
    subprocess.run(["ip", "link", "add", probe, "type", "bridge"], check=True, timeout=10)
    try:
        seen = exec_sync(nr, cid, ["ip", "-o", "link"]).stdout.decode()
    finally:
        subprocess.run(["ip", "link", "del", probe], check=False, timeout=10)
    seen_links = {line.split(":")[1].strip().split("@")[0] for line in seen.splitlines()}
    assert probe in seen_links and "eth0" in seen_links, seen_links
    for path in ("/etc/resolv.conf", "/etc/hosts"):
        with open(path, "rb") as f:
            assert exec_sync(nr, cid, ["cat", path]).stdout == f.read(), path
    assert exec_sync(nr, cid, ["hostname"]).stdout.decode().strip() == os.uname().nodename

    cid2 = running(nr, p2, c2, "look", ["sleep", "1000"])
    assert exec_sync(nr, cid2, ["cat", "/etc/resolv.conf"]).stdout == b"nameserver 10.0.0.10\n"
    for p in (p1, p2):
        stop_remove(nr, p)
    assert snapshot(nr) == before


def test_pod_cidr_dual_stack(net_rt: NetRuntime) -> None:
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    v6 = ipaddress.IPv6Network(f"fd00:5d:{nr.net.subnet.network_address.packed[2]:x}::/64")
    conf = nr.net.conflist()
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "usePodCidr"}]]
    conf["plugins"][0]["ipam"]["routes"] = [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    write_conf(nr, conf)
    cond = network_condition(nr)
    assert cond.status is False and "pod CIDR" in cond.message
    rt.client.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr=f"{nr.net.subnet},{v6}"))))
    assert network_condition(nr).status is True
    pod_id, cfg = rt.run_pod("dual")
    ip, more = pod_ip(nr, pod_id)
    assert ipaddress.ip_address(ip) in nr.net.subnet
    assert len(more) == 1 and ipaddress.ip_address(more[0]) in v6
    cid = running(nr, pod_id, cfg, "look", ["sleep", "1000"])
    addrs = exec_sync(nr, cid, ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout.decode()
    assert f"inet {ip}/" in addrs and f"inet6 {more[0]}/" in addrs
    hosts = exec_sync(nr, cid, ["cat", "/etc/hosts"]).stdout.decode()
    assert f"{ip}\tdual" in hosts.splitlines()
    assert rules_of(nr.net.name, nat_rules("ip6tables-save"))[0], "no IPv6 masquerade rule: is ipMasq on?"
    stop_remove(nr, pod_id)
    assert nr.net.allocations() == []
    assert our_rules(nr)[0] == [] and rules_of(nr.net.name, nat_rules("ip6tables-save"))[0] == []


def test_capability_args_reach_the_plugins(net_rt: NetRuntime) -> None:
    """bandwidth annotations shape the host veth; portMappings, cgroupPath and K8S_* are recorded for DEL."""
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    ports_before = bridge_ports(nr)
    pod_id, _ = rt.run_pod("shaped", annotations={"kubernetes.io/ingress-bandwidth": "1M"},
                           port_mappings=[pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=free_port())])
    (veth,) = bridge_ports(nr) - ports_before
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", veth], capture_output=True, text=True, timeout=10).stdout
    assert "tbf" in qdisc and "rate 1Mbit" in qdisc, qdisc
    record = json.loads((rt.proc.root / "network" / f"{pod_id}.json").read_text())
    assert record["runtime_config"]["cgroupPath"]
    assert record["runtime_config"]["portMappings"][0]["protocol"] == "udp"
    assert "K8S_POD_NAME=shaped" in record["cni_args"] and f"K8S_POD_INFRA_CONTAINER_ID={pod_id}" in record["cni_args"]
    mine, _ = our_rules(nr)
    assert any("dport" in r and "udp" in r for r in mine), mine
    stop_remove(nr, pod_id)
    assert our_rules(nr)[0] == [] and nr.net.allocations() == []


def _cni_phases(nr: NetRuntime, pod_id: str, rpc: str) -> set[str]:
    """The CNI plugins shimd ran for one call, from its `rpc phases` debug line (main line and overlapped)."""
    deadline = time.monotonic() + 10
    while True:
        for line in nr.rt.proc.log_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and e.get("event") == "rpc phases" and e.get("rpc") == rpc \
                    and e.get("pod_id") == pod_id:
                return {p for p in [*e["phases"], *e.get("overlapped", {})] if p.startswith("cni_")}
        assert time.monotonic() < deadline, f"no phases line for {rpc} of {pod_id}"
        time.sleep(0.05)  # the line is written as the handler returns, just after the reply


def test_plugins_with_nothing_to_do_are_not_run(net_rt: NetRuntime) -> None:
    """portmap without port mappings, bandwidth without a limit and a chained loopback (shimd brings `lo`
    up itself) pass prevResult on and hold nothing: neither their ADD nor their DEL is executed; with
    mappings and a limit portmap and bandwidth are."""
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    idle = {"portmap", "bandwidth", "loopback"}
    plain, _ = rt.run_pod("plain")
    assert pod_ip(nr, plain)[0]
    ran = _cni_phases(nr, plain, "RunPodSandbox")
    assert "cni_add:bridge" in ran and not {f"cni_add:{t}" for t in idle} & ran, ran
    netns = rt.proc.state / "ns" / plain / "network"
    lo = subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "addr", "show", "dev", "lo"], capture_output=True,
                        text=True, timeout=10, check=True).stdout
    assert "127.0.0.1/8" in lo and "::1/128" in lo, lo  # the kernel gives lo its addresses only once it is up
    stop_remove(nr, plain)
    ran = _cni_phases(nr, plain, "StopPodSandbox")
    assert "cni_del:bridge" in ran and not {f"cni_del:{t}" for t in idle} & ran, ran
    assert nr.net.allocations() == []

    shaped, _ = rt.run_pod("shaped", annotations={"kubernetes.io/egress-bandwidth": "1M"},
                           port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=free_port())])
    assert {"cni_add:portmap", "cni_add:bandwidth"} <= _cni_phases(nr, shaped, "RunPodSandbox")
    assert our_rules(nr)[0], "portmap made no rule"
    stop_remove(nr, shaped)
    assert {"cni_del:portmap", "cni_del:bandwidth"} <= _cni_phases(nr, shaped, "StopPodSandbox")
    links = subprocess.run(["ip", "-o", "link", "show", "type", "ifb"], capture_output=True, text=True,
                           timeout=10).stdout
    assert our_rules(nr)[0] == [] and nr.net.allocations() == [] and "bwp" not in links, links


# --- churn and restarts ----------------------------------------------------------------------------------

CHURN_PODS = 50
CHURN_WORKERS = 6


def test_fifty_pods_leave_nothing_behind(net_rt: NetRuntime) -> None:
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    rt.run_pod("warm-up")  # creates the bridge and the shared portmap chains once, outside the comparison
    stop_remove(nr, rt.client.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items[0].id)
    before = snapshot(nr)

    def make(i: int) -> str:
        return rt.run_pod(f"churn-{i}", port_mappings=[
            pb.PortMapping(protocol=pb.TCP, container_port=80, host_port=40000 + i)])[0]

    with ThreadPoolExecutor(CHURN_WORKERS) as pool:
        pods = list(pool.map(make, range(CHURN_PODS)))
        peak = snapshot(nr)
        ips = {pod_ip(nr, p)[0] for p in pods}
        _, pod_chains = our_rules(nr)
        list(pool.map(lambda p: stop_remove(nr, p), pods))

    assert len(ips) == CHURN_PODS and len(peak.allocations) == CHURN_PODS
    assert len(peak.pins) == CHURN_PODS and len(peak.links) == CHURN_PODS
    assert len(pod_chains) >= CHURN_PODS  # one masquerade and one DNAT chain per pod
    assert snapshot(nr) == before
    assert not (pod_chains & declared_chains()), "per-pod CNI chains left in the nat table"


def test_del_after_restart_and_without_netns(net_rt: NetRuntime) -> None:
    nr, rt, pb = net_rt, net_rt.rt, net_rt.rt.pb
    before = snapshot(nr)
    kept, kept_cfg = rt.run_pod("kept", port_mappings=[pb.PortMapping(container_port=80, host_port=free_port())])
    gone, _ = rt.run_pod("ns-gone")
    running(nr, kept, kept_cfg, "sleeper", ["sleep", "1000"])
    assert len(nr.net.allocations()) == 2

    rt.proc.kill()  # SIGKILL: no chance to tear anything down
    # The second pod's network namespace disappears while shimd is down (veth and all).
    subprocess.run(["umount", "-l", str(rt.proc.state / "ns" / gone / "network")], check=True, timeout=10)
    rt.proc.start()

    assert len(nr.net.allocations()) == 2
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=gone))
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=gone))  # idempotent
    assert len(nr.net.allocations()) == 1
    assert not [r for r in our_rules(nr)[0] if gone in r], "masquerade rules of the namespace-less pod left"
    rt.client.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=kept))
    assert nr.net.allocations() == [] and our_rules(nr)[0] == []
    for p in (kept, gone):
        rt.client.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p))
    assert snapshot(nr) == before


SLOW_PLUGIN = """#!/usr/bin/env python3
# A chained CNI plugin that passes the previous result through, slowly on ADD (test helper).
import json, os, sys, time
conf = json.load(sys.stdin)
if os.environ.get("CNI_COMMAND") == "ADD":
    open(conf["marker"], "w").close()
    time.sleep(conf["sleep"])
    json.dump(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}, sys.stdout)
elif os.environ.get("CNI_COMMAND") == "VERSION":
    json.dump({"cniVersion": conf.get("cniVersion", "1.0.0"), "supportedVersions": ["0.4.0", "1.0.0"]}, sys.stdout)
"""


def test_crash_during_cni_add_is_undone_on_restart(net_rt: NetRuntime) -> None:
    """shimd killed while a RunPodSandbox is half way through the CNI chain: the restart frees the IP."""
    nr, rt = net_rt, net_rt.rt
    before = snapshot(nr)
    bin_dir = nr.net.root / "bin"
    bin_dir.mkdir()
    (bin_dir / "shimd-test-slow").write_text(SLOW_PLUGIN)
    (bin_dir / "shimd-test-slow").chmod(0o755)
    marker = nr.net.root / "slow-started"
    conf = nr.net.conflist()
    conf["plugins"].insert(1, {"type": "shimd-test-slow", "marker": str(marker), "sleep": 30})
    write_conf(nr, conf)
    # The plugin's directory must be in shimd's bin_dirs: restart with it.
    rt.proc.stop()
    text = rt.proc.config_path.read_text().replace(json.dumps(CNI_BIN_DIRS), json.dumps([str(bin_dir), *CNI_BIN_DIRS]))
    rt.proc.config_path.write_text(text)
    rt.proc.start()

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(rt.run_pod, "interrupted")
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline and not pending.done(), "the slow plugin never ran"
            time.sleep(0.05)
        assert len(nr.net.allocations()) == 1  # bridge's ADD has taken an address
        rt.proc.kill()
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=20)
    write_conf(nr, nr.net.conflist())  # the slow plugin is not needed any more (DEL would be fast anyway)
    rt.proc.start()
    deadline = time.monotonic() + 15
    while snapshot(nr) != before:
        assert time.monotonic() < deadline, f"left after recovery: {snapshot(nr)} (before: {before})"
        time.sleep(0.2)
