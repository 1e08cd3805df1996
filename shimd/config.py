"""shimd configuration: embedded defaults, optional TOML file, strict validation.

Every key has a default here, so shimd runs with no file at all; `shimd config default` prints
them. A file may set any subset. Unknown keys and wrong types are errors that name the file,
the key and why, because a silently ignored typo in a runtime's config is a production outage.
"""

from __future__ import annotations

import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/shimd/config.toml")

DRIVERS = ("runc", "runsc", "shimv2")
# Which shim runs a runc handler's pods: the compiled one (shims/native), the Python one (shims/runc), or
# the compiled one when it is installed and the Python one otherwise.
SHIMS = ("auto", "native", "python")
CGROUP_DRIVERS = ("cgroupfs", "systemd")
LOG_LEVELS = ("debug", "info", "warning", "error")
RUNSC_PLATFORMS = ("systrap", "ptrace", "kvm")
RUNSC_NETWORKS = ("host", "none", "sandbox")
# The pause process of pods sharing a PID namespace and of sandboxed runtimes (Debian's catatonit package).
PAUSE_BINARY = "/usr/bin/catatonit"


class ConfigError(Exception):
    def __init__(self, source: str, key: str, why: str) -> None:
        super().__init__(f"{source}: {key}: {why}")
        self.source, self.key, self.why = source, key, why


# Below this kubelet's ordinary requests would be refused; above it the gRPC length prefix cannot say it.
MIN_RECV_MESSAGE_SIZE, MAX_RECV_MESSAGE_SIZE = 65536, 2**32 - 1


@dataclass
class DaemonConfig:
    socket: str = "/run/shimd/shimd.sock"
    root: str = "/var/lib/shimd"
    state: str = "/run/shimd"
    # Mount a tmpfs at `state` when it is an empty directory on disk (shimd/state_fs.py).
    state_tmpfs: bool = True
    log_level: str = "info"
    cgroup_driver: str = "cgroupfs"
    default_handler: str = "runc"
    # Upper bound on any single call to a shim or an OCI runtime binary.
    runtime_timeout_seconds: float = 60.0
    # Largest request message the CRI socket accepts (containerd's default): bigger ones are refused unread.
    max_recv_message_size: int = 16 * 1024 * 1024


@dataclass
class HandlerConfig:
    name: str
    driver: str = "runc"
    # Runtime binary: runc/crun/runsc path, or a shim v2 binary for driver "shimv2".
    binary: str = "runc"
    # State root passed as --root to the OCI runtime (one per handler, so handlers never collide).
    root: str = ""
    extra_args: list[str] = field(default_factory=list)
    # runsc only.
    platform: str = "ptrace"  # every runsc has it; systrap needs gVisor >= 2023
    network: str = "host"
    overlay: bool = True
    debug_log_dir: str = ""
    # shimv2 only: containerd runtime type (io.containerd.kata.v2) and the runtime's own config file.
    runtime_type: str = ""
    config_path: str = ""
    # Containers of a pod under this handler must be told apart by these annotations.
    pod_annotations: list[str] = field(default_factory=list)
    # runc only: which shim runs its pods (SHIMS).
    shim: str = "auto"


@dataclass
class RegistryHostConfig:
    host: str
    mirrors: list[str] = field(default_factory=list)
    # Plain HTTP (and unverified TLS) allowed for this host.
    insecure: bool = False


@dataclass
class RegistriesConfig:
    # docker config.json format ({"auths": {"host": {"auth": base64(user:pass)}}}).
    credentials_file: str = ""
    hosts: dict[str, RegistryHostConfig] = field(default_factory=dict)
    max_concurrent_downloads: int = 4


@dataclass
class CniConfig:
    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: list[str] = field(default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"])


@dataclass
class StreamingConfig:
    address: str = "127.0.0.1:10010"
    tls_cert: str = ""
    tls_key: str = ""
    token_ttl_seconds: float = 60.0


@dataclass
class MetricsConfig:
    address: str = ""  # "" = no Prometheus endpoint; else host:port


@dataclass
class TracingConfig:
    endpoint: str = ""  # "" = no tracing; else an OTLP/HTTP collector's base URL
    sampling_ratio: float = 1.0  # calls traced when the caller sent no sampling decision
    service_name: str = "shimd"


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    handlers: dict[str, HandlerConfig] = field(default_factory=dict)
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    cni: CniConfig = field(default_factory=CniConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    source: str = "<defaults>"


def default_handlers(state: str) -> dict[str, HandlerConfig]:
    return {
        "runc": HandlerConfig(name="runc", driver="runc", binary="runc", root=f"{state}/runc"),
        "runsc": HandlerConfig(name="runsc", driver="runsc", binary="runsc", root=f"{state}/runsc"),
    }


DEFAULT_TOML = """\
# shimd configuration (/etc/shimd/config.toml). Every key below is the embedded default, so a file
# needs only what it changes; unknown keys and wrong types are errors. Check a file with
# `shimd config check FILE`, and a whole node with `shimd check`.

[daemon]
socket = "/run/shimd/shimd.sock"       # CRI gRPC socket kubelet and crictl dial (mode 0660, directory 0711)
root = "/var/lib/shimd"                # persistent data: images, writable layers, pod and container records
state = "/run/shimd"                   # runtime state: shim sockets, namespace pins, bundles (lost on reboot)
state_tmpfs = true                     # mount a tmpfs at state when it is an empty directory on a disk filesystem
log_level = "info"                     # debug | info | warning | error (JSON lines on stderr)
cgroup_driver = "cgroupfs"             # cgroupfs | systemd (must match kubelet's cgroupDriver)
default_handler = "runc"               # handler for pods whose RuntimeClass names none
runtime_timeout_seconds = 60.0         # upper bound on one shim call or OCI runtime command
max_recv_message_size = 16777216       # bytes; a larger CRI request is refused (RESOURCE_EXHAUSTED) unread

# One table per runtime handler; the table name is the RuntimeClass `handler`.
[handlers.runc]
driver = "runc"                        # runc (runc/crun CLI) | runsc (gVisor) | shimv2 (any containerd shim v2)
binary = "runc"                        # OCI runtime binary, looked up in PATH unless absolute
root = "/run/shimd/runc"               # the runtime's --root (state of its containers); one per handler
extra_args = []                        # extra global flags for every runtime command, e.g. ["--debug"]
shim = "auto"                          # native (compiled, ~0.5 MiB per pod) | python | auto (native if installed)

[handlers.runsc]
driver = "runsc"                       # gVisor: a user-space kernel per pod
binary = "runsc"                       # runsc binary, looked up in PATH unless absolute
root = "/run/shimd/runsc"              # runsc --root
platform = "ptrace"                    # ptrace | systrap (gVisor >= 2023) | kvm (needs /dev/kvm)
network = "host"                       # host (gVisor uses the pod netns) | none | sandbox (not with CNI)
overlay = true                         # container rootfs writes stay in sandbox memory
debug_log_dir = ""                     # "" = off; else a directory for runsc debug logs (large)
extra_args = []                        # extra runsc global flags

# [handlers.kata]                      # example: Kata Containers through its shim v2 binary
# driver = "shimv2"                    # the shim binary is started the way containerd starts it
# binary = "containerd-shim-kata-v2"   # shim v2 binary, looked up in PATH unless absolute
# runtime_type = "io.containerd.kata.v2"  # containerd runtime type the shim expects
# config_path = "/etc/kata-containers/configuration.toml"  # the runtime's own configuration file

[registries]
credentials_file = ""                  # docker config.json style {"auths": {...}}; "" = anonymous pulls
max_concurrent_downloads = 4           # layer downloads in flight across all pulls

# [registries.hosts."docker.io"]       # per-registry settings, keyed by host[:port]
# mirrors = ["https://mirror.example.internal"]  # tried in order before the registry itself
# insecure = false                     # allow plain HTTP / unverified TLS (a registry on this node,
#                                      # localhost, 127.0.0.0/8 or ::1, without an entry: plain HTTP)

[cni]
conf_dir = "/etc/cni/net.d"            # first valid *.conflist/*.conf/*.json (by name) is the pod network
bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]  # where CNI plugin binaries are searched, in order

[streaming]
address = "127.0.0.1:10010"            # exec/attach/port-forward server kubelet redirects to (port 0 = any)
tls_cert = ""                          # PEM certificate; set with tls_key to serve HTTPS
tls_key = ""                           # PEM private key of tls_cert
token_ttl_seconds = 60.0               # how long an exec/attach/port-forward URL stays valid

[metrics]
address = ""                           # Prometheus /metrics, e.g. "127.0.0.1:10257"; "" = off

[tracing]
endpoint = ""                          # OTLP/HTTP collector for CRI call spans, e.g. "http://127.0.0.1:4318"; "" = off
sampling_ratio = 1.0                   # share of calls traced when the caller (kubelet) sent no sampling decision
service_name = "shimd"                 # the spans' service.name
"""


class _Reader:
    """Pops typed keys out of one TOML table and complains about the rest."""

    def __init__(self, source: str, prefix: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(source, prefix, "must be a table")
        self.source, self.prefix, self.table = source, prefix, dict(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def take(self, name: str, kind: type | tuple[type, ...], default: Any, choices: tuple[str, ...] = ()) -> Any:
        if name not in self.table:
            return default
        value = self.table.pop(name)
        ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
        if not ok:
            want = kind.__name__ if isinstance(kind, type) else "number"
            raise ConfigError(self.source, self.key(name), f"must be a {want}, got {value!r}")
        if choices and value not in choices:
            raise ConfigError(self.source, self.key(name), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def take_list(self, name: str, default: list[str]) -> list[str]:
        value = self.take(name, list, default)
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(self.source, self.key(name), "must be a list of strings")
        return list(value)

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(sorted(self.key(k) for k in self.table))
            raise ConfigError(self.source, unknown, "unknown key")


def _abs_path(source: str, key: str, value: str) -> str:
    if value and not value.startswith("/"):
        raise ConfigError(source, key, f"must be an absolute path, got {value!r}")
    return value


def _daemon(source: str, raw: Any) -> DaemonConfig:
    r, d = _Reader(source, "daemon", raw), DaemonConfig()
    cfg = DaemonConfig(
        socket=_abs_path(source, "daemon.socket", r.take("socket", str, d.socket)),
        root=_abs_path(source, "daemon.root", r.take("root", str, d.root)),
        state=_abs_path(source, "daemon.state", r.take("state", str, d.state)),
        state_tmpfs=r.take("state_tmpfs", bool, d.state_tmpfs),
        log_level=r.take("log_level", str, d.log_level, LOG_LEVELS),
        cgroup_driver=r.take("cgroup_driver", str, d.cgroup_driver, CGROUP_DRIVERS),
        default_handler=r.take("default_handler", str, d.default_handler),
        runtime_timeout_seconds=float(r.take("runtime_timeout_seconds", (int, float), d.runtime_timeout_seconds)),
        max_recv_message_size=r.take("max_recv_message_size", int, d.max_recv_message_size),
    )
    r.done()
    if cfg.runtime_timeout_seconds <= 0:
        raise ConfigError(source, "daemon.runtime_timeout_seconds", "must be positive")
    if not MIN_RECV_MESSAGE_SIZE <= cfg.max_recv_message_size <= MAX_RECV_MESSAGE_SIZE:
        raise ConfigError(source, "daemon.max_recv_message_size",
                          f"must be between {MIN_RECV_MESSAGE_SIZE} and {MAX_RECV_MESSAGE_SIZE} bytes")
    return cfg


def _handler(source: str, name: str, raw: Any, state: str) -> HandlerConfig:
    r = _Reader(source, f"handlers.{name}", raw)
    driver = r.take("driver", str, "runc", DRIVERS)
    d = HandlerConfig(name=name, driver=driver, binary={"runc": "runc", "runsc": "runsc"}.get(driver, ""))
    cfg = HandlerConfig(
        name=name,
        driver=driver,
        binary=r.take("binary", str, d.binary),
        root=_abs_path(source, f"handlers.{name}.root", r.take("root", str, f"{state}/{name}")),
        extra_args=r.take_list("extra_args", []),
        platform=r.take("platform", str, d.platform, RUNSC_PLATFORMS),
        network=r.take("network", str, d.network, RUNSC_NETWORKS),
        overlay=r.take("overlay", bool, d.overlay),
        debug_log_dir=_abs_path(source, f"handlers.{name}.debug_log_dir", r.take("debug_log_dir", str, "")),
        runtime_type=r.take("runtime_type", str, ""),
        config_path=_abs_path(source, f"handlers.{name}.config_path", r.take("config_path", str, "")),
        pod_annotations=r.take_list("pod_annotations", []),
        shim=r.take("shim", str, "auto", SHIMS),
    )
    r.done()
    if cfg.shim == "native" and driver != "runc":
        raise ConfigError(source, f"handlers.{name}.shim",
                          f"the native shim runs runc handlers only, not driver {driver!r}")
    if not cfg.binary:
        raise ConfigError(source, f"handlers.{name}.binary", f"driver {driver!r} needs a binary")
    return cfg


def _registries(source: str, raw: Any) -> RegistriesConfig:
    r, d = _Reader(source, "registries", raw), RegistriesConfig()
    creds = _abs_path(source, "registries.credentials_file", r.take("credentials_file", str, d.credentials_file))
    conc = r.take("max_concurrent_downloads", int, d.max_concurrent_downloads)
    if conc < 1:
        raise ConfigError(source, "registries.max_concurrent_downloads", "must be at least 1")
    hosts: dict[str, RegistryHostConfig] = {}
    for host, table in r.take("hosts", dict, {}).items():
        hr = _Reader(source, f'registries.hosts."{host}"', table)
        mirrors = hr.take_list("mirrors", [])
        for m in mirrors:
            if not (m.startswith("http://") or m.startswith("https://")):
                raise ConfigError(source, f'registries.hosts."{host}".mirrors', f"{m!r} must start with http:// or https://")
        hosts[host] = RegistryHostConfig(host=host, mirrors=mirrors, insecure=hr.take("insecure", bool, False))
        hr.done()
    r.done()
    return RegistriesConfig(credentials_file=creds, hosts=hosts, max_concurrent_downloads=conc)


def _cni(source: str, raw: Any) -> CniConfig:
    r, d = _Reader(source, "cni", raw), CniConfig()
    cfg = CniConfig(
        conf_dir=_abs_path(source, "cni.conf_dir", r.take("conf_dir", str, d.conf_dir)),
        bin_dirs=r.take_list("bin_dirs", d.bin_dirs),
    )
    r.done()
    return cfg


def _streaming(source: str, raw: Any) -> StreamingConfig:
    r, d = _Reader(source, "streaming", raw), StreamingConfig()
    cfg = StreamingConfig(
        address=r.take("address", str, d.address),
        tls_cert=_abs_path(source, "streaming.tls_cert", r.take("tls_cert", str, "")),
        tls_key=_abs_path(source, "streaming.tls_key", r.take("tls_key", str, "")),
        token_ttl_seconds=float(r.take("token_ttl_seconds", (int, float), d.token_ttl_seconds)),
    )
    r.done()
    host, sep, port = cfg.address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(source, "streaming.address", f"must be host:port, got {cfg.address!r}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError(source, "streaming.tls_cert", "tls_cert and tls_key must be set together")
    return cfg


def _metrics(source: str, raw: Any) -> MetricsConfig:
    r = _Reader(source, "metrics", raw)
    cfg = MetricsConfig(address=r.take("address", str, ""))
    r.done()
    if cfg.address:
        host, sep, port = cfg.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(source, "metrics.address", f"must be empty or host:port, got {cfg.address!r}")
    return cfg


def _tracing(source: str, raw: Any) -> TracingConfig:
    r, d = _Reader(source, "tracing", raw), TracingConfig()
    cfg = TracingConfig(
        endpoint=r.take("endpoint", str, d.endpoint),
        sampling_ratio=float(r.take("sampling_ratio", (int, float), d.sampling_ratio)),
        service_name=r.take("service_name", str, d.service_name),
    )
    r.done()
    if cfg.endpoint:
        url = urllib.parse.urlsplit(cfg.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError(source, "tracing.endpoint",
                              f"must be empty or an http(s) URL of an OTLP/HTTP collector, got {cfg.endpoint!r}")
    if not 0.0 <= cfg.sampling_ratio <= 1.0:
        raise ConfigError(source, "tracing.sampling_ratio", f"must be between 0 and 1, got {cfg.sampling_ratio!r}")
    if not cfg.service_name:
        raise ConfigError(source, "tracing.service_name", "must not be empty")
    return cfg


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    top = _Reader(source, "", data)
    daemon = _daemon(source, top.take("daemon", dict, {}))
    handlers = default_handlers(daemon.state)
    for name, table in top.take("handlers", dict, {}).items():
        if not name or "/" in name:
            raise ConfigError(source, f"handlers.{name}", "handler names must be non-empty and contain no '/'")
        handlers[name] = _handler(source, name, table, daemon.state)
    cfg = Config(
        daemon=daemon,
        handlers=handlers,
        registries=_registries(source, top.take("registries", dict, {})),
        cni=_cni(source, top.take("cni", dict, {})),
        streaming=_streaming(source, top.take("streaming", dict, {})),
        metrics=_metrics(source, top.take("metrics", dict, {})),
        tracing=_tracing(source, top.take("tracing", dict, {})),
        source=source,
    )
    top.done()
    if daemon.default_handler not in handlers:
        raise ConfigError(source, "daemon.default_handler",
                          f"{daemon.default_handler!r} is not a configured handler ({', '.join(sorted(handlers))})")
    return cfg


def load(path: Path | None = None) -> Config:
    """Load `path`, or the default path when it exists, or the embedded defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return parse({}, "<defaults>")
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), "-", f"cannot read: {e.strerror}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "-", f"not valid TOML: {e}") from e
    return parse(data, str(path))
