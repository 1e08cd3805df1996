"""CNI config loading and selection, pod CIDR placeholders, per-plugin stdin, result parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shimd import cli
from shimd.config import CniConfig
from shimd.errors import FailedPrecondition, InvalidArgument
from shimd.network import cni, defaults
from shimd.network.manager import NetworkManager


def write(d: Path, name: str, obj: object) -> Path:
    p = d / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_parse_conflist_and_single_conf() -> None:
    net = cni.parse_config("/x/a.conflist", json.dumps(defaults.conflist()).encode())
    assert net.name == "shimd" and net.cni_version == "1.0.0"
    assert [p["type"] for p in net.plugins] == ["bridge", "portmap", "bandwidth", "loopback"]
    single = cni.parse_config("/x/b.conf", b'{"cniVersion":"0.4.0","name":"n","type":"ptp","ipam":{}}')
    assert single.plugins == [{"type": "ptp", "ipam": {}}] and single.cni_version == "0.4.0"


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("a.conflist", "{nope", "not valid JSON"),
        ("a.conflist", "[]", "JSON object"),
        ("a.conflist", '{"cniVersion":"1.0.0","plugins":[{"type":"bridge"}]}', "name"),
        ("a.conflist", '{"name":"n","plugins":[]}', "plugins"),
        ("a.conflist", '{"name":"n","plugins":[{"x":1}]}', "plugins[0]"),
        ("a.conf", '{"name":"n"}', "plugins[0]"),
        ("a.conf", '{"name":"n","type":"../../bin/sh"}', "plain binary"),
    ],
)
def test_parse_rejects(name: str, data: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        cni.parse_config(name, data.encode())


def test_cache_picks_first_valid_in_lexical_order(tmp_path: Path) -> None:
    cache = cni.ConfigCache(str(tmp_path))
    net, why = cache.get()
    assert net is None and "no network config found" in why and str(tmp_path) in why
    write(tmp_path, "README.md", "not a config")
    write(tmp_path, "20-b.conf", {"cniVersion": "0.4.0", "name": "b", "type": "bridge"})
    write(tmp_path, "10-a.json", {"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "ptp"}]})
    write(tmp_path, "05-bad.conflist", "{")
    net, why = cache.get()
    assert net is not None and net.name == "a" and why == ""
    # Changing a file in place (same directory mtime) is noticed too.
    p = tmp_path / "10-a.json"
    p.write_text(json.dumps({"cniVersion": "1.0.0", "name": "a2", "plugins": [{"type": "ptp"}]}))
    os.utime(p, ns=(1, 1))
    assert cache.get()[0].name == "a2"  # type: ignore[union-attr]
    p.unlink()
    assert cache.get()[0].name == "b"  # type: ignore[union-attr]


def test_cache_reports_every_rejected_file(tmp_path: Path) -> None:
    write(tmp_path, "a.conflist", "{")
    write(tmp_path, "b.conf", {"name": "x"})
    net, why = cni.ConfigCache(str(tmp_path)).get()
    assert net is None and "a.conflist" in why and "b.conf" in why


def test_missing_dir_is_not_ready(tmp_path: Path) -> None:
    mgr = NetworkManager(CniConfig(conf_dir=str(tmp_path / "none"), bin_dirs=["/usr/lib/cni"]), tmp_path / "s")
    ready, reason, message = mgr.status()
    assert not ready and reason == "NetworkPluginNotReady" and str(tmp_path / "none") in message


def test_status_names_missing_plugin(tmp_path: Path) -> None:
    write(tmp_path, "a.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "nothere"}]})
    mgr = NetworkManager(CniConfig(conf_dir=str(tmp_path), bin_dirs=[str(tmp_path / "bin")]), tmp_path / "s")
    ready, _, message = mgr.status()
    assert not ready and "nothere" in message and str(tmp_path / "bin") in message


def test_pod_cidr_substitution(tmp_path: Path) -> None:
    conf = {"cniVersion": "1.0.0", "name": "n", "plugins": [
        {"type": "bridge", "ipam": {"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}]]}},
        {"type": "x", "note": "cidr={{.PodCIDR}}"}]}
    write(tmp_path, "a.conflist", conf)
    mgr = NetworkManager(CniConfig(conf_dir=str(tmp_path), bin_dirs=["/usr/lib/cni"]), tmp_path / "s")
    net = mgr._configs.get()[0]
    assert net is not None and cni.uses_pod_cidr(net)
    with pytest.raises(FailedPrecondition, match="pod CIDR"):
        cni.apply_pod_cidr(net, [])
    out = cni.apply_pod_cidr(net, ["10.244.1.0/24", "fd00:1::/64"])
    assert out.plugins[0]["ipam"]["ranges"] == [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:1::/64"}]]
    assert out.plugins[1]["note"] == "cidr=10.244.1.0/24"
    assert net.plugins[0]["ipam"]["ranges"] == [[{"subnet": "usePodCidr"}]]  # the cached config is untouched
    with pytest.raises(InvalidArgument, match="pod_cidr"):
        mgr.set_pod_cidr("10.0.0.0/33")
    mgr.set_pod_cidr("10.244.1.0/24")
    mgr.set_pod_cidr("")  # kubelet sends empty updates: keep the CIDR
    assert mgr._pod_cidrs == ["10.244.1.0/24"]


def test_plugin_config_injects_only_declared_capabilities() -> None:
    net = cni.NetworkList("n", "1.0.0", [], "src")
    rc = {"portMappings": [{"hostPort": 1}], "bandwidth": {"ingressRate": 1}, "cgroupPath": "/x"}
    pm = cni.plugin_config(net, {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False},
                                 "runtimeConfig": {"stale": 1}}, rc, {"ips": []})
    assert pm["runtimeConfig"] == {"portMappings": [{"hostPort": 1}]}
    assert pm["name"] == "n" and pm["cniVersion"] == "1.0.0" and pm["prevResult"] == {"ips": []}
    br = cni.plugin_config(net, {"type": "bridge"}, rc, None)
    assert "runtimeConfig" not in br and "prevResult" not in br


@pytest.mark.parametrize(("ptype", "conf", "idle"), [
    ("portmap", {}, True),
    ("portmap", {"runtimeConfig": {"portMappings": []}}, True),
    ("portmap", {"runtimeConfig": {"portMappings": [{"hostPort": 80}]}}, False),
    ("bandwidth", {}, True),
    ("bandwidth", {"runtimeConfig": {"bandwidth": {"ingressRate": 0, "egressRate": 0}}}, True),
    ("bandwidth", {"runtimeConfig": {"bandwidth": {"egressRate": 8000, "egressBurst": 80}}}, False),
    ("bandwidth", {"ingressRate": 8000, "ingressBurst": 80}, False),
    # The plugin's own entry wins over the runtime config's, even with no rate in it.
    ("bandwidth", {"shapedSubnets": ["10.0.0.0/8"], "runtimeConfig": {"bandwidth": {"ingressRate": 1}}}, True),
    ("bandwidth", {"runtimeConfig": {"bandwidth": "bogus"}}, False),
    ("loopback", {}, True),
    ("loopback", {"prevResult": {"ips": []}}, True),
    ("bridge", {}, False),
    ("tuning", {}, False),
])
def test_plugins_that_would_do_nothing(ptype: str, conf: dict[str, object], idle: bool) -> None:
    assert cni.does_nothing(ptype, {"type": ptype, **conf}) is idle


def test_invocation_env() -> None:
    inv = cni.Invocation("ADD", "cid", "/ns", "eth0", "IgnoreUnknown=1", ["/a", "/b"])
    env = inv.env()
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_PATH"] == "/a:/b" and env["CNI_NETNS"] == "/ns"
    assert "/usr/sbin" in env["PATH"].split(":")


def test_result_ips() -> None:
    result = {
        "interfaces": [{"name": "br0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/ns"}],
        "ips": [{"address": "10.0.0.1/24", "interface": 0}, {"address": "fd00::5/64", "interface": 2},
                {"address": "10.0.0.5/24", "interface": 2}, {"address": "127.0.0.1/8"}],
    }
    ips = cni.result_ips(result)
    assert ips == ["fd00::5", "10.0.0.5"]
    assert cni.primary_and_additional(ips) == ("10.0.0.5", ["fd00::5"])
    assert cni.result_ips({"ip4": {"ip": "10.1.0.2/16"}}) == ["10.1.0.2"]
    assert cni.primary_and_additional([]) == ("", [])


def test_plugin_error_classes() -> None:
    net = cni.NetworkList("n", "1.0.0", [], "/etc/cni/net.d/x.conflist")
    e = cni.plugin_error("bridge", net, "ADD", "no IP addresses available in range set")
    assert type(e).__name__ == "ResourceExhausted" and "'bridge'" in str(e) and "x.conflist" in str(e)
    assert isinstance(cni.plugin_error("portmap", net, "ADD", "bad"), FailedPrecondition)


def test_cli_cni_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "cni-default"]) == 0
    net = cni.parse_config("x.conflist", capsys.readouterr().out.encode())
    bridge = net.plugins[0]
    assert bridge["bridge"] == "shimd0" and bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.88.0.0/16"}]]
    assert net.plugins[1]["capabilities"] == {"portMappings": True}
    assert net.plugins[-1]["type"] == "loopback"


def test_recorded_pods(tmp_path: Path) -> None:
    mgr = NetworkManager(CniConfig(conf_dir=str(tmp_path), bin_dirs=[]), tmp_path / "state")
    assert mgr.recorded_pods() == []
    (tmp_path / "state").mkdir()
    for name in ("b.json", "a.json", ".a.json.tmp1"):
        (tmp_path / "state" / name).write_text("{}")
    assert mgr.recorded_pods() == ["a", "b"]
    with pytest.raises(InvalidArgument, match="pod id"):
        mgr._record_path("../x")
