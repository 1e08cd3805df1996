"""Pod networking with the real CNI plugins from /usr/lib/cni, each test on its own bridge and subnet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shimd.errors import FailedPrecondition, ResourceExhausted
from shimd.network import namespaces as ns
from shimd.network.manager import NetworkManager, PodNetworkRequest, PodNetworkResult, PortMapping
from tests.support.network import CniNetwork, nat_rules, rules_of


def request(net: CniNetwork, pod_id: str, netns: str, **kw: object) -> PodNetworkRequest:
    return PodNetworkRequest(pod_id=pod_id, name=f"name-{pod_id}", namespace="default", uid=f"uid-{pod_id}",
                             netns_path=netns, **kw)  # type: ignore[arg-type]


async def start_pod(net: CniNetwork, mgr: NetworkManager, pod_id: str,
                    **kw: object) -> tuple[str, PodNetworkResult]:
    paths = await ns.create_pod_namespaces(pod_id, net.ns_dir, ["network"], pod_id)
    return paths["network"], await mgr.setup(request(net, pod_id, paths["network"], **kw))


async def stop_pod(net: CniNetwork, mgr: NetworkManager, pod_id: str) -> None:
    await mgr.teardown(pod_id, str(net.ns_dir / pod_id / "network"))
    await ns.remove_pod_namespaces(pod_id, net.ns_dir)


async def run(*argv: str, timeout: float = 10) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode or 0, out.decode(errors="replace")


def _write_index(root: Path) -> None:
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text("hello from the pod\n")


@contextlib.asynccontextmanager
async def httpd_in(netns: str, root: Path, port: int = 8080) -> AsyncIterator[None]:
    await asyncio.to_thread(_write_index, root)
    p = await asyncio.create_subprocess_exec("nsenter", f"--net={netns}", "busybox", "httpd", "-f", "-p", str(port),
                                             "-h", str(root))
    try:
        for _ in range(100):  # until it listens
            # (this busybox's nc has no -z and its wget -T crashes: plain wget, bounded by run())
            rc, _ = await run("nsenter", f"--net={netns}", "busybox", "wget", "-q", "-O", "/dev/null",
                              f"http://127.0.0.1:{port}/")
            if rc == 0:
                break
            await asyncio.sleep(0.05)
        yield
    finally:
        p.kill()
        await asyncio.wait_for(p.wait(), 5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def host_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing address
        return str(s.getsockname()[0])


async def http_get(host: str, port: int) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode(errors="replace")


async def test_two_pods_ping_and_http(cni_network: CniNetwork, tmp_path: Path) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    assert mgr.status() == (True, "", "")
    a_ns, a = await start_pod(net, mgr, "pod-a")
    b_ns, b = await start_pod(net, mgr, "pod-b")
    assert a.ip != b.ip and {a.ip, b.ip} <= {net.ip(i) for i in range(2, 10)}
    assert a.additional_ips == [] and a.raw["cniVersion"] == "1.0.0"
    rc, out = await run("nsenter", f"--net={a_ns}", "busybox", "ping", "-c1", "-W3", b.ip)
    assert rc == 0, out
    async with httpd_in(a_ns, tmp_path / "www"):
        rc, out = await run("nsenter", f"--net={b_ns}", "busybox", "wget", "-q", "-O-",
                            f"http://{a.ip}:8080/")
        assert rc == 0 and "hello from the pod" in out, out
    for pod in ("pod-a", "pod-b"):
        await stop_pod(net, mgr, pod)
    assert net.allocations() == []
    assert list(net.state_dir.iterdir()) == []


async def test_port_mapping_from_host(cni_network: CniNetwork, tmp_path: Path) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    port = free_port()
    a_ns, _ = await start_pod(net, mgr, "pod-pm", port_mappings=[PortMapping("tcp", 8080, port)])
    async with httpd_in(a_ns, tmp_path / "www"):
        assert "hello from the pod" in await http_get(host_ip(), port)
    mine, _ = rules_of(net.name, nat_rules())
    assert any(f"--dports {port}" in r for r in mine)
    await stop_pod(net, mgr, "pod-pm")
    assert rules_of(net.name, nat_rules())[0] == []


@pytest.mark.timeout(180)
async def test_fifty_pods_leave_nothing_behind(cni_network: CniNetwork) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    # Warm-up: the bridge and portmap's shared chains are created once and stay, by design.
    await start_pod(net, mgr, "warm", port_mappings=[PortMapping("tcp", 80, free_port())])
    await stop_pod(net, mgr, "warm")
    rules_before = rules_of(net.name, nat_rules())[0]
    links_before = (await run("ip", "-o", "link", "show", "master", net.bridge))[1]
    assert rules_before == [] and links_before.strip() == ""

    ids = [f"p{i:02d}" for i in range(50)]
    sem = asyncio.Semaphore(8)

    async def one(pod_id: str, i: int) -> PodNetworkResult:
        async with sem:
            return (await start_pod(net, mgr, pod_id, port_mappings=[PortMapping("tcp", 80, 20000 + i)]))[1]

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(*(one(p, i) for i, p in enumerate(ids)))
    t_up = loop.time() - t0
    assert len({r.ip for r in results}) == 50
    assert len(net.allocations()) == 50
    mine, chains = rules_of(net.name, nat_rules())
    assert len(mine) >= 100 and chains

    async def down(pod_id: str) -> None:
        async with sem:
            await stop_pod(net, mgr, pod_id)

    t0 = loop.time()
    await asyncio.gather(*(down(p) for p in ids))
    t_down = loop.time() - t0
    print(f"\n50 pods: setup {t_up:.2f}s, teardown {t_down:.2f}s")
    after = nat_rules()
    assert rules_of(net.name, after)[0] == []
    declared = {line.split()[0][1:] for line in after if line.startswith(":")}
    assert not (chains - {c for c in chains if c.startswith("CNI-HOSTPORT-")}) & declared
    assert net.allocations() == []
    assert os.listdir(net.ns_dir) == [] and list(net.state_dir.iterdir()) == []
    assert (await run("ip", "-o", "link", "show", "master", net.bridge))[1].strip() == ""


async def test_ipam_exhaustion_is_clear_and_leaks_nothing(cni_network: CniNetwork) -> None:
    net = cni_network
    conf = net.conflist()
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": str(net.subnet), "rangeStart": net.ip(2),
                                              "rangeEnd": net.ip(5)}]]
    net.write(conf)
    mgr = net.manager()
    for i in range(4):
        await start_pod(net, mgr, f"full{i}")
    assert len(net.allocations()) == 4
    paths = await ns.create_pod_namespaces("extra", net.ns_dir, ["network"], "extra")
    with pytest.raises(ResourceExhausted, match=r"'bridge'.*no IP addresses available"):
        await mgr.setup(request(net, "extra", paths["network"], port_mappings=[PortMapping("tcp", 80, free_port())]))
    assert len(net.allocations()) == 4
    assert not (net.state_dir / "extra.json").exists()
    assert rules_of(net.name, nat_rules())[0] == [r for r in rules_of(net.name, nat_rules())[0] if '"extra' not in r]
    _, links = await run("nsenter", f"--net={paths['network']}", "ip", "-o", "link")
    assert "eth0" not in links
    await ns.remove_pod_namespaces("extra", net.ns_dir)
    for i in range(4):
        await stop_pod(net, mgr, f"full{i}")
    assert net.allocations() == []


async def test_teardown_after_restart(cni_network: CniNetwork) -> None:
    net = cni_network
    net.write()
    netns, res = await start_pod(net, net.manager(), "pod-r", port_mappings=[PortMapping("tcp", 80, free_port())])
    assert net.allocations() == [res.ip]
    fresh = net.manager()  # a restarted shimd: nothing in memory
    await fresh.teardown("pod-r", netns)
    assert net.allocations() == []
    assert rules_of(net.name, nat_rules())[0] == []
    await fresh.teardown("pod-r", netns)  # idempotent
    await ns.remove_pod_namespaces("pod-r", net.ns_dir)


async def test_teardown_after_netns_gone(cni_network: CniNetwork) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    netns, _ = await start_pod(net, mgr, "pod-g", port_mappings=[PortMapping("tcp", 80, free_port())])
    await ns.remove_pod_namespaces("pod-g", net.ns_dir)
    await mgr.teardown("pod-g", netns)
    assert net.allocations() == []
    assert list(net.state_dir.iterdir()) == []
    assert rules_of(net.name, nat_rules())[0] == []
    assert rules_of(net.name, nat_rules("ip6tables-save"))[0] == []


async def test_prepared_before_the_namespace_exists(cni_network: CniNetwork) -> None:
    """RunPodSandbox saves CNI's record while it makes the namespaces: prepare needs only the pin's path,
    add needs the namespace; without one it refuses, and leaves neither a record nor an address."""
    net = cni_network
    net.write()
    mgr = net.manager()
    netns = ns.pin_path(net.ns_dir, "pod-p", "network")
    prepared = await mgr.prepare(request(net, "pod-p", netns))
    assert [p.name for p in net.state_dir.iterdir()] == ["pod-p.json"]  # saved before any ADD
    paths = await ns.create_pod_namespaces("pod-p", net.ns_dir, ["network"], "pod-p")
    assert paths["network"] == netns
    res = await mgr.add(prepared)
    assert net.allocations() == [res.ip]
    await stop_pod(net, mgr, "pod-p")
    assert net.allocations() == [] and list(net.state_dir.iterdir()) == []

    prepared = await mgr.prepare(request(net, "pod-q", ns.pin_path(net.ns_dir, "pod-q", "network")))
    with pytest.raises(FailedPrecondition, match=r"network namespace .* does not exist"):
        await mgr.add(prepared)
    assert net.allocations() == [] and list(net.state_dir.iterdir()) == []


async def test_missing_plugin(cni_network: CniNetwork) -> None:
    net = cni_network
    conf = net.conflist()
    conf["plugins"].insert(1, {"type": "no-such-plugin"})
    net.write(conf)
    mgr = net.manager()
    ready, reason, message = mgr.status()
    assert not ready and reason == "NetworkPluginNotReady" and "no-such-plugin" in message
    paths = await ns.create_pod_namespaces("pod-m", net.ns_dir, ["network"], "pod-m")
    with pytest.raises(FailedPrecondition, match="no-such-plugin"):
        await mgr.setup(request(net, "pod-m", paths["network"]))
    assert net.allocations() == []
    assert not net.state_dir.exists() or list(net.state_dir.iterdir()) == []


async def test_bad_plugin_config_is_undone(cni_network: CniNetwork) -> None:
    net = cni_network
    conf = net.conflist()
    conf["plugins"][1]["snat"] = "not-a-bool"  # portmap rejects its config after bridge has allocated
    net.write(conf)
    mgr = net.manager()
    assert mgr.status()[0]
    paths = await ns.create_pod_namespaces("pod-b", net.ns_dir, ["network"], "pod-b")
    # With a port mapping: without one portmap would have nothing to do and is not run at all.
    with pytest.raises(FailedPrecondition, match="'portmap'"):
        await mgr.setup(request(net, "pod-b", paths["network"], port_mappings=[PortMapping("tcp", 80, free_port())]))
    assert net.allocations() == []
    assert list(net.state_dir.iterdir()) == []
    assert rules_of(net.name, nat_rules())[0] == []


async def test_invalid_and_missing_config_dir(cni_network: CniNetwork) -> None:
    net = cni_network
    mgr = net.manager()
    ready, _, message = mgr.status()
    assert not ready and str(net.conf_dir) in message
    net.write({"cniVersion": "1.0.0", "name": "x", "plugins": []}, "05-broken.conflist")
    ready, _, message = mgr.status()
    assert not ready and "05-broken.conflist" in message and "plugins" in message
    paths = await ns.create_pod_namespaces("pod-c", net.ns_dir, ["network"], "pod-c")
    with pytest.raises(FailedPrecondition, match="05-broken"):
        await mgr.setup(request(net, "pod-c", paths["network"]))
    net.write()  # picked up without a restart
    assert mgr.status() == (True, "", "")
    res = await mgr.setup(request(net, "pod-c", paths["network"]))
    assert res.ip
    await stop_pod(net, mgr, "pod-c")


async def test_cancelled_setup_leaks_nothing(cni_network: CniNetwork) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    paths = await ns.create_pod_namespaces("pod-x", net.ns_dir, ["network"], "pod-x")
    for delay in (0.01, 0.03, 0.06, 0.1, 0.15, 0.3):
        task = asyncio.create_task(mgr.setup(request(net, "pod-x", paths["network"])))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Cancellation waits for the undo: nothing is left even before any teardown.
            assert net.allocations() == [] and list(net.state_dir.iterdir()) == []
            assert rules_of(net.name, nat_rules())[0] == []
        await mgr.teardown("pod-x", paths["network"])
        assert net.allocations() == []
    await ns.remove_pod_namespaces("pod-x", net.ns_dir)


async def test_pod_cidr_placeholder(cni_network: CniNetwork) -> None:
    net = cni_network
    conf = net.conflist()
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "usePodCidr"}]]
    net.write(conf)
    mgr = net.manager()
    assert not mgr.status()[0]
    mgr.set_pod_cidr(str(net.subnet))
    assert mgr.status()[0]
    _, res = await start_pod(net, mgr, "pod-cidr")
    assert res.ip.startswith(str(net.subnet.network_address)[:-1])
    record = json.loads((net.state_dir / "pod-cidr.json").read_text())
    assert record["network"]["plugins"][0]["ipam"]["ranges"][0][0]["subnet"] == str(net.subnet)
    await stop_pod(net, mgr, "pod-cidr")
    assert net.allocations() == []


async def test_dual_stack_and_bandwidth(cni_network: CniNetwork) -> None:
    net = cni_network
    v6 = f"fd00:123:{net.subnet.network_address.packed[2]:x}::/64"
    conf = net.conflist()
    conf["plugins"][0]["ipam"]["ranges"].append([{"subnet": v6}])
    conf["plugins"][0]["ipam"]["routes"].append({"dst": "::/0"})
    net.write(conf)
    mgr = net.manager()
    annotations = {"kubernetes.io/ingress-bandwidth": "2M", "kubernetes.io/egress-bandwidth": "3M"}
    netns, res = await start_pod(net, mgr, "pod-6", annotations=annotations,
                                 port_mappings=[PortMapping("tcp", 80, free_port())])
    assert res.ip == net.ip(2) and res.additional_ips == [v6.replace("::/64", "::2")]
    _, addrs = await run("nsenter", f"--net={netns}", "ip", "-o", "addr", "show", "eth0")
    assert net.ip(2) in addrs and res.additional_ips[0] in addrs
    host_veth = next(i["name"] for i in res.raw["interfaces"] if i["name"].startswith("veth"))
    _, qdiscs = await run("tc", "qdisc", "show", "dev", host_veth)
    assert "tbf" in qdiscs and "2Mbit" in qdiscs, qdiscs  # ingress shaping on the host side
    await ns.remove_pod_namespaces("pod-6", net.ns_dir)  # and the netns is gone before teardown
    await mgr.teardown("pod-6", netns)
    assert net.allocations() == []
    assert rules_of(net.name, nat_rules())[0] == [] and rules_of(net.name, nat_rules("ip6tables-save"))[0] == []
    ifb = next(i["name"] for i in res.raw["interfaces"] if i["name"].startswith("bwp"))  # egress shaping device
    _, links = await run("ip", "-o", "link", "show")
    assert host_veth not in links and ifb not in links


def test_busybox_has_the_applets_these_tests_use() -> None:
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True, timeout=10).stdout.split()
    assert {"httpd", "ping", "wget"} <= set(applets)


async def test_same_pod_twice_concurrently(cni_network: CniNetwork) -> None:
    net = cni_network
    net.write()
    mgr = net.manager()
    paths = await ns.create_pod_namespaces("pod-2", net.ns_dir, ["network"], "pod-2")
    req = request(net, "pod-2", paths["network"])
    results = await asyncio.gather(mgr.setup(req), mgr.setup(req), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "PodNetworkResult"]
    assert len(net.allocations()) == 1
    await asyncio.gather(mgr.teardown("pod-2", paths["network"]), mgr.teardown("pod-2", paths["network"]))
    assert net.allocations() == [] and mgr._locks == {}
    await ns.remove_pod_namespaces("pod-2", net.ns_dir)
