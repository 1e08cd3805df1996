"""CNI mechanics: finding the network configuration, and executing plugins as the CNI spec says.

Nothing here knows about pods; shimd.network.manager drives ADD/DEL chains with these pieces.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from shimd import log
from shimd.errors import FailedPrecondition, ResourceExhausted, ShimdError
from shimd.network import proc

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
PLUGIN_TIMEOUT = 60.0
POD_CIDR_SUBNET = "usePodCidr"  # host-local range subnet placeholder (as kubenet/containerd templates use)
POD_CIDR_TEMPLATE = "{{.PodCIDR}}"
# Errors in a plugin's message that mean "out of addresses" rather than "misconfigured".
_EXHAUSTED = re.compile(r"no IP addresses available|no free IP|range set.*full|exhausted", re.IGNORECASE)

_log = log.get("network.cni")


@dataclass(frozen=True)
class NetworkList:
    """One network (a conflist, or a single .conf wrapped as a list of one plugin)."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cniVersion": self.cni_version, "plugins": self.plugins, "source": self.source}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> NetworkList:
        return NetworkList(obj["name"], obj["cniVersion"], obj["plugins"], obj.get("source", ""))


def version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


def parse_config(path: str, data: bytes) -> NetworkList:
    """Parse one config file; ValueError says why it is not usable."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    name, version = obj.get("name"), obj.get("cniVersion", "0.1.0")
    if not isinstance(name, str) or not name:
        raise ValueError("missing network 'name'")
    if not isinstance(version, str):
        raise ValueError("'cniVersion' must be a string")
    if path.endswith(".conflist") or "plugins" in obj:
        plugins = obj.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("'plugins' must be a non-empty list")
    else:
        plugins = [{k: v for k, v in obj.items() if k not in ("name", "cniVersion")}]
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise ValueError(f"plugins[{i}] has no 'type'")
        if "/" in p["type"]:
            raise ValueError(f"plugins[{i}] type {p['type']!r} must be a plain binary name")
    return NetworkList(name, version, plugins, path)


class ConfigCache:
    """The first valid network config in conf_dir, re-read only when a candidate file changes.

    Each use costs one listdir and one stat per candidate file, so edits in place and new files
    are noticed without a restart and without watching the directory.
    """

    def __init__(self, conf_dir: str) -> None:
        self.conf_dir = conf_dir
        # (signature, result) in one attribute: get() runs both on the event loop (Status) and in
        # worker threads (setup), and a reader must never pair a new signature with an old result.
        self._cached: tuple[tuple[Any, ...] | None, tuple[NetworkList | None, str]] = (None, (None, ""))

    def _scan(self) -> tuple[tuple[Any, ...], list[str]]:
        try:
            names = sorted(n for n in os.listdir(self.conf_dir) if n.endswith(CONF_EXTENSIONS))
        except OSError as e:
            return (("error", e.errno),), []
        sig: list[Any] = []
        paths = []
        for n in names:
            p = os.path.join(self.conf_dir, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            sig.append((n, st.st_ino, st.st_mtime_ns, st.st_size))
            paths.append(p)
        return tuple(sig), paths

    def get(self) -> tuple[NetworkList | None, str]:
        """(network, "") or (None, why there is none)."""
        sig, paths = self._scan()
        cached_sig, cached = self._cached
        if sig == cached_sig:
            return cached
        rejected = []
        found: NetworkList | None = None
        for p in paths:
            try:
                with open(p, "rb") as f:
                    found = parse_config(p, f.read())
                break
            except (OSError, ValueError) as e:
                rejected.append(f"{os.path.basename(p)}: {e}")
        if found is not None:
            why = ""
            if rejected:
                _log.warning("skipped invalid CNI configs", conf_dir=self.conf_dir, rejected=rejected)
        elif rejected:
            why = f"no valid network config in {self.conf_dir} ({'; '.join(rejected)})"
        else:
            why = f"no network config found in {self.conf_dir}"
        if found is not None and found != cached[0]:
            _log.info("using CNI network", network=found.name, source=found.source, cni_version=found.cni_version)
        self._cached = (sig, (found, why))
        return found, why


def find_plugin(plugin_type: str, bin_dirs: list[str]) -> str | None:
    for d in bin_dirs:
        p = os.path.join(d, plugin_type)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def uses_pod_cidr(net: NetworkList) -> bool:
    text = json.dumps(net.plugins)
    return f'"{POD_CIDR_SUBNET}"' in text or POD_CIDR_TEMPLATE in text


def apply_pod_cidr(net: NetworkList, cidrs: list[str]) -> NetworkList:
    """Fill the pod CIDR placeholders: host-local range subnets "usePodCidr" (one range set per CIDR,
    so a dual-stack "v4,v6" pod CIDR yields both families) and "{{.PodCIDR}}" in any string."""
    if not uses_pod_cidr(net):
        return net
    if not cidrs:
        raise FailedPrecondition(f"CNI network {net.name!r} ({net.source}) uses the pod CIDR, "
                                 "which kubelet has not set yet (UpdateRuntimeConfig)")

    def is_placeholder(r: Any) -> bool:
        return isinstance(r, dict) and r.get("subnet") == POD_CIDR_SUBNET

    def subst(obj: Any) -> Any:
        if isinstance(obj, str):
            return obj.replace(POD_CIDR_TEMPLATE, cidrs[0])
        if isinstance(obj, list):
            return [subst(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k == "ranges" and isinstance(v, list):
                expanded: list[Any] = []
                for rset in v:
                    if isinstance(rset, list) and any(is_placeholder(r) for r in rset):
                        expanded.extend([subst({**r, "subnet": c}) if is_placeholder(r) else subst(r) for r in rset]
                                        for c in cidrs)
                    else:
                        expanded.append(subst(rset))
                out[k] = expanded
            elif k == "subnet" and v == POD_CIDR_SUBNET:
                out[k] = cidrs[0]
            else:
                out[k] = subst(v)
        return out

    return NetworkList(net.name, net.cni_version, subst(copy.deepcopy(net.plugins)), net.source)


def plugin_config(net: NetworkList, plugin: dict[str, Any], runtime_config: dict[str, Any],
                  prev_result: dict[str, Any] | None) -> dict[str, Any]:
    """The stdin document for one plugin: its own keys plus name, cniVersion, the runtimeConfig
    entries it declared as capabilities, and the previous plugin's result."""
    conf = {k: v for k, v in plugin.items() if k != "runtimeConfig"}
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    caps = plugin.get("capabilities") or {}
    rc = {k: v for k, v in runtime_config.items() if isinstance(caps, dict) and caps.get(k)}
    if rc:
        conf["runtimeConfig"] = rc
    if prev_result is not None:
        conf["prevResult"] = prev_result
    return conf


_BANDWIDTH_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")


def does_nothing(plugin_type: str, conf: dict[str, Any]) -> bool:
    """True for a reference meta plugin that, given this stdin document, neither changes anything on
    ADD (it passes prevResult on) nor has anything to undo on DEL, so running it is only a process
    spawn on the pod's critical path: portmap without port mappings, bandwidth without a limit.
    Both ADD and DEL decide from the same recorded document, so a skipped ADD means a skipped DEL.

    Callers ask only for plugins after the first of a chain (which have a result to pass on). loopback
    there does nothing: its ADD brings `lo` up and passes prevResult on, but shimd brings `lo` up as it
    makes the pod's network namespace (namespaces.py); its DEL takes `lo` down in a namespace that is
    removed with the pod. (8 ms for each exec on a 2-core machine, ADD and DEL both.)"""
    if plugin_type == "loopback":
        return True
    rc = conf.get("runtimeConfig")
    rc = rc if isinstance(rc, dict) else {}
    if plugin_type == "portmap":
        return not rc.get("portMappings")
    if plugin_type == "bandwidth":
        # As the plugin reads it: any entry key of its own config wins over the runtime config's entry.
        own = {"unshapedSubnets", "shapedSubnets", *_BANDWIDTH_KEYS} & conf.keys()
        entry = {k: conf[k] for k in own} if own else rc.get("bandwidth")
        if entry is None:
            return True
        return isinstance(entry, dict) and all(entry.get(k) in (None, 0) for k in _BANDWIDTH_KEYS)
    return False


@dataclass
class Invocation:
    """What stays the same for every plugin of one ADD or DEL run."""

    command: str  # ADD | DEL | CHECK
    container_id: str
    netns: str
    ifname: str
    cni_args: str
    bin_dirs: list[str]
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        # Plugins exec iptables/ip via PATH; daemons often run without the sbin directories.
        env["PATH"] = f"{env.get('PATH', '')}:{proc.FALLBACK_PATH}".lstrip(":")
        env.update(CNI_COMMAND=self.command, CNI_CONTAINERID=self.container_id, CNI_NETNS=self.netns,
                   CNI_IFNAME=self.ifname, CNI_ARGS=self.cni_args, CNI_PATH=":".join(self.bin_dirs))
        env.update(self.extra_env)
        return env


def plugin_error(plugin: str, net: NetworkList, command: str, msg: str) -> ShimdError:
    text = f"CNI plugin {plugin!r} of network {net.name!r} ({net.source}) failed {command}: {msg}"
    return ResourceExhausted(text) if _EXHAUSTED.search(msg) else FailedPrecondition(text)


async def exec_plugin(net: NetworkList, plugin: dict[str, Any], inv: Invocation,
                      conf: dict[str, Any]) -> dict[str, Any] | None:
    """Run one plugin; its result for ADD, None for DEL/CHECK; errors name the plugin."""
    ptype = plugin["type"]
    path = find_plugin(ptype, inv.bin_dirs)
    if path is None:
        raise FailedPrecondition(f"CNI plugin {ptype!r} of network {net.name!r} ({net.source}) "
                                 f"not found in {', '.join(inv.bin_dirs)}")
    done = await proc.run([path], stdin=json.dumps(conf).encode(), env=inv.env(), time_limit=PLUGIN_TIMEOUT)
    if done.returncode != 0:
        msg = done.stderr.decode(errors="replace").strip()
        try:
            err = json.loads(done.stdout)
            msg = err.get("msg", "") + (f" ({err['details']})" if err.get("details") else "") + \
                f" [code {err.get('code')}]" + (f"; stderr: {msg}" if msg else "")
        except (ValueError, AttributeError):
            msg = (done.stdout.decode(errors="replace").strip() + " " + msg).strip() or f"exit {done.returncode}"
        raise plugin_error(ptype, net, inv.command, msg)
    if inv.command != "ADD":
        return None
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise plugin_error(ptype, net, inv.command, f"result is not JSON: {done.stdout[:200]!r}") from None
    if not isinstance(result, dict):
        raise plugin_error(ptype, net, inv.command, "result is not a JSON object")
    return result


def result_ips(result: dict[str, Any]) -> list[str]:
    """The pod's addresses from a CNI result (0.3.0+ "ips", or 0.1/0.2 "ip4"/"ip6"), in result order,
    without host-side or loopback addresses."""
    addrs: list[str] = []
    if "ips" in result:
        ifaces = result.get("interfaces") or []
        for entry in result.get("ips") or []:
            idx = entry.get("interface")
            if isinstance(idx, int) and 0 <= idx < len(ifaces) and not ifaces[idx].get("sandbox"):
                continue  # an address on the host side (e.g. a bridge gateway), not the pod's
            addrs.append(str(entry.get("address", "")))
    else:
        addrs.extend(str(result[k].get("ip", "")) for k in ("ip4", "ip6") if isinstance(result.get(k), dict))
    out = []
    for a in addrs:
        ip = a.split("/", 1)[0]
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if not parsed.is_loopback and ip not in out:
            out.append(ip)
    return out


def primary_and_additional(ips: list[str]) -> tuple[str, list[str]]:
    """IPv4 first, as kubelet expects the primary PodIP of a dual-stack pod by default."""
    if not ips:
        return "", []
    v4 = [ip for ip in ips if ipaddress.ip_address(ip).version == 4]
    primary = v4[0] if v4 else ips[0]
    return primary, [ip for ip in ips if ip != primary]
