"""`shimd check`: verify that a node can run shimd, and say precisely what is wrong when it cannot.

Each check yields Findings (ok / warn / fail) with a message and, for problems, the fix. The
command exits 1 when any check fails, so installers and DaemonSets can gate on it. Nothing is
changed on the node: the checks only read files, run `--version`-style probes and, when shimd is
running, call Version and Status on its socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from shimd import cgroups, config, mounts, state_fs
from shimd.network import cni
from shimd.runtimes.runc import NATIVE_SHIM_NAME, find_native_shim

OK, WARN, FAIL = "ok", "warn", "fail"
KUBELET_CONFIG = Path("/var/lib/kubelet/config.yaml")
PROBE_TIMEOUT = 10.0
MIN_FREE_BYTES = 2 << 30  # below this, pulls and writable layers start failing on a busy node


@dataclass
class Finding:
    level: str
    area: str
    message: str
    fix: str = ""


def _ok(area: str, msg: str) -> Finding:
    return Finding(OK, area, msg)


def _warn(area: str, msg: str, fix: str = "") -> Finding:
    return Finding(WARN, area, msg, fix)


def _fail(area: str, msg: str, fix: str = "") -> Finding:
    return Finding(FAIL, area, msg, fix)


# --- host --------------------------------------------------------------------------------------

def check_host() -> list[Finding]:
    out = []
    if os.geteuid() != 0:
        out.append(_fail("host", "shimd must run as root (namespaces, mounts, cgroups)", "run shimd as root"))
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as e:
        filesystems = ""
        out.append(_warn("host", f"cannot read /proc/filesystems: {e.strerror}"))
    if re.search(r"\boverlay$", filesystems, re.M):
        out.append(_ok("host", "overlay filesystem available"))
    elif filesystems:
        out.append(_fail("host", "overlay filesystem not available (container root filesystems need it)",
                         "modprobe overlay, and add 'overlay' to /etc/modules-load.d/shimd.conf"))
    return out


def check_cgroups(cfg: config.Config, kubelet_config: Path = KUBELET_CONFIG) -> list[Finding]:
    out = []
    roots = cgroups.hierarchy_roots()
    if not roots:
        out.append(_fail("cgroups", "no cgroup hierarchy is mounted under /sys/fs/cgroup",
                         "mount cgroup2 on /sys/fs/cgroup (or boot with systemd)"))
    else:
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        layout = "cgroup v2 (unified)" if unified else "cgroup v1/hybrid"
        out.append(_ok("cgroups", f"{layout}: {len(roots)} hierarchies"))
    driver = cfg.daemon.cgroup_driver
    systemd_init = Path("/run/systemd/system").is_dir()
    if driver == "systemd" and not systemd_init:
        out.append(_fail("cgroups", "daemon.cgroup_driver is 'systemd' but systemd is not the init system",
                         "set daemon.cgroup_driver = \"cgroupfs\" (and cgroupDriver: cgroupfs for kubelet)"))
    elif driver == "cgroupfs" and systemd_init:
        out.append(_warn("cgroups", "systemd is init but daemon.cgroup_driver is 'cgroupfs': two cgroup managers "
                                    "share the tree", "use cgroup_driver = \"systemd\" in shimd and kubelet"))
    else:
        out.append(_ok("cgroups", f"cgroup driver {driver!r} suits this init system"))
    kubelet = kubelet_cgroup_driver(kubelet_config)
    if kubelet is not None:
        if kubelet != driver:
            out.append(_fail("cgroups", f"kubelet uses cgroupDriver {kubelet!r} ({kubelet_config}) but shimd uses "
                                        f"{driver!r}", "make daemon.cgroup_driver and kubelet's cgroupDriver equal"))
        else:
            out.append(_ok("cgroups", f"kubelet's cgroupDriver matches ({kubelet})"))
    return out


def kubelet_cgroup_driver(path: Path) -> str | None:
    """cgroupDriver from a KubeletConfiguration file; kubelet's own default is cgroupfs."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"^cgroupDriver:\s*[\"']?(\w+)", text, re.M)
    return m.group(1) if m else "cgroupfs"


# --- runtimes -----------------------------------------------------------------------------------

async def _run(argv: list[str]) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
    except OSError as e:
        return 127, str(e)
    try:
        data, _ = await asyncio.wait_for(proc.communicate(), timeout=PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"timed out after {PROBE_TIMEOUT:.0f}s"
    return proc.returncode or 0, data.decode(errors="replace").strip()


async def check_handler(cfg: config.Config, h: config.HandlerConfig) -> list[Finding]:
    area = f"handler {h.name}"
    binary = shutil.which(h.binary)
    if binary is None:
        why = f"{h.driver} binary {h.binary!r} not found in PATH"
        level = _fail if h.name == cfg.daemon.default_handler else _warn
        return [level(area, why, f"install it, or set handlers.{h.name}.binary to its path"
                                 + ("" if h.name == cfg.daemon.default_handler else
                                    f", or delete [handlers.{h.name}] if it is not wanted"))]
    if h.driver == "shimv2":
        # A shim v2 binary has no side-effect-free probe; being executable is what can be checked.
        if not os.access(binary, os.X_OK):
            return [_fail(area, f"{binary} is not executable", f"chmod +x {binary}")]
        out = [_ok(area, f"shim v2 binary {binary}")]
        if h.config_path and not await asyncio.to_thread(os.path.exists, h.config_path):
            out.append(_fail(area, f"config_path {h.config_path} does not exist",
                             f"install the runtime's configuration or fix handlers.{h.name}.config_path"))
        return out
    code, text = await _run([binary, "--version"])
    if code != 0:
        return [_fail(area, f"{binary} --version exited {code}: {text[:200]}", "reinstall the runtime")]
    version = text.splitlines()[0] if text else binary
    # `list` with a private root exercises the runtime's state handling without creating anything.
    probe_root = await asyncio.to_thread(tempfile.mkdtemp, prefix=f"shimd-check-{h.name}-")
    try:
        code, text = await _run([binary, "--root", probe_root, "list"])
    finally:
        await asyncio.to_thread(shutil.rmtree, probe_root, True)
    if code != 0:
        return [_fail(area, f"{binary} does not work: `list` exited {code}: {text[:200]}",
                      "check the runtime's installation and kernel support")]
    out = [_ok(area, f"{version} ({binary})"), *_shim_findings(area, h)]
    if h.driver == "runsc" and h.network == "sandbox":
        out.append(_warn(area, "runsc network 'sandbox' needs netstack support on this host; 'host' is the "
                               "tested choice", f'set handlers.{h.name}.network = "host"'))
    return out


def _shim_findings(area: str, h: config.HandlerConfig) -> list[Finding]:
    """Which shim a runc handler's pods run under (handlers.<name>.shim)."""
    if h.driver != "runc":
        return []
    if h.shim == "python":
        return [_ok(area, f"pods run under the Python shim (handlers.{h.name}.shim = \"python\")")]
    native = find_native_shim()
    if native is not None:
        return [_ok(area, f"pods run under the compiled shim {native}")]
    why = f"the compiled shim {NATIVE_SHIM_NAME} is not installed"
    fix = "build it with `make native` (needs cargo) or install it in PATH"
    if h.shim == "native":
        return [_fail(area, why, fix)]
    return [_warn(area, f"{why}: pods run under the Python shim (~3 MiB more memory per pod)", fix)]


def check_pause() -> list[Finding]:
    if os.access(config.PAUSE_BINARY, os.X_OK):
        return [_ok("pause", f"{config.PAUSE_BINARY} present (pods with a shared PID namespace, runsc, Kata)")]
    return [_fail("pause", f"{config.PAUSE_BINARY} missing: pods sharing a PID namespace and sandboxed runtimes "
                           "cannot start", "apt-get install catatonit")]


# --- network ------------------------------------------------------------------------------------

def check_cni(cfg: config.Config) -> list[Finding]:
    net, why = cni.ConfigCache(cfg.cni.conf_dir).get()
    if net is None:
        return [_fail("cni", why, f"install a CNI network config in {cfg.cni.conf_dir} "
                                  f"(e.g. `shimd config cni-default > {cfg.cni.conf_dir}/10-shimd.conflist`)")]
    out = [_ok("cni", f"network {net.name!r} from {net.source} (CNI {net.cni_version})")]
    missing = [p["type"] for p in net.plugins if cni.find_plugin(p["type"], cfg.cni.bin_dirs) is None]
    if missing:
        out.append(_fail("cni", f"plugins {missing} not found in {', '.join(cfg.cni.bin_dirs)}",
                         "apt-get install containernetworking-plugins, or add their directory to cni.bin_dirs"))
    else:
        out.append(_ok("cni", f"plugins present: {', '.join(p['type'] for p in net.plugins)}"))
    if cni.uses_pod_cidr(net):
        out.append(_warn("cni", f"network {net.name!r} takes its subnet from kubelet's pod CIDR; pods wait for "
                                "UpdateRuntimeConfig"))
    return out


def check_streaming(cfg: config.Config) -> list[Finding]:
    host = cfg.streaming.address.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.streaming.tls_cert:
        return [_warn("streaming", f"exec/attach server listens on {cfg.streaming.address} without TLS",
                      "set streaming.tls_cert and streaming.tls_key, or bind it to 127.0.0.1")]
    return [_ok("streaming", f"exec/attach server address {cfg.streaming.address}")]


# --- storage and socket -------------------------------------------------------------------------

def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_storage(cfg: config.Config) -> list[Finding]:
    out = []
    for key, d in (("daemon.root", cfg.daemon.root), ("daemon.state", cfg.daemon.state)):
        base = _existing_parent(Path(d))
        st = os.statvfs(base)
        free = st.f_bavail * st.f_frsize
        if free < MIN_FREE_BYTES:
            out.append(_warn("storage", f"{key} {d}: only {free >> 20} MiB free on {base}",
                             "free space or move it to a larger filesystem"))
        else:
            out.append(_ok("storage", f"{key} {d}: {free >> 30} GiB free"))
        if Path(d).exists() and Path(d).stat().st_mode & 0o022:
            out.append(_fail("storage", f"{d} is group/world writable", f"chmod 0711 {d}"))
    out.append(_state_filesystem(cfg))
    return out


def _state_filesystem(cfg: config.Config) -> Finding:
    state = Path(cfg.daemon.state)
    kind = mounts.filesystem_type_sync(state)
    if kind in state_fs.MEMORY_FILESYSTEMS:
        return _ok("storage", f"daemon.state {state} is on {kind}")
    holds_state = state.is_dir() and any(state.iterdir())
    if cfg.daemon.state_tmpfs and not holds_state:
        return _ok("storage", f"daemon.state {state} is on {kind}: shimd mounts a tmpfs there when it starts")
    return _warn("storage", f"daemon.state {state} is on {kind}: every pod's files are made there on disk",
                 "stop shimd with no pod left, empty the directory and keep daemon.state_tmpfs = true "
                 "(or mount a tmpfs there)")


def check_socket_file(cfg: config.Config) -> list[Finding]:
    sock = Path(cfg.daemon.socket)
    try:
        st = sock.lstat()
    except FileNotFoundError:
        return [_warn("socket", f"{sock} does not exist: shimd is not running", "systemctl start shimd")]
    out = []
    if not stat.S_ISSOCK(st.st_mode):
        return [_fail("socket", f"{sock} exists but is not a socket", f"remove {sock}; shimd recreates it")]
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        out.append(_fail("socket", f"{sock} is accessible to every user (mode {mode:04o}): anyone could run "
                                   "privileged containers", f"chmod 0660 {sock} (shimd sets this itself)"))
    if st.st_uid != 0:
        out.append(_fail("socket", f"{sock} is owned by uid {st.st_uid}, not root", f"chown root {sock}"))
    dmode = stat.S_IMODE(sock.parent.stat().st_mode)
    if dmode & 0o002:
        out.append(_fail("socket", f"{sock.parent} is world writable (mode {dmode:04o})", f"chmod 0700 {sock.parent}"))
    if not out:
        out.append(_ok("socket", f"{sock} mode {mode:04o}, directory {dmode:04o}, owner root"))
    return out


def check_records(cfg: config.Config) -> list[Finding]:
    """Records shimd could not parse at start-up: kept aside for inspection, what they owned cleaned up."""
    from shimd.store.store import UNREADABLE_SUFFIX

    root = Path(cfg.daemon.root)
    aside = sorted(str(p) for kind in ("pods", "containers") if (root / kind).is_dir()
                   for p in (root / kind).glob(f"*.json{UNREADABLE_SUFFIX}"))
    if not aside:
        return []
    return [_warn("records", f"{len(aside)} unreadable record(s) kept aside: {', '.join(aside[:5])}"
                  + (" ..." if len(aside) > 5 else ""),
                  "shimd cleaned up what they owned at start-up; inspect them, then delete them")]


async def check_running(cfg: config.Config) -> list[Finding]:
    """Version and Status over the CRI socket, as kubelet would call them."""
    if not await asyncio.to_thread(Path(cfg.daemon.socket).is_socket):
        return []
    from grpclib.client import Channel
    from grpclib.exceptions import GRPCError

    from shimd.api.runtime import v1 as cri

    channel = Channel(path=cfg.daemon.socket)
    try:
        stub = cri.RuntimeServiceStub(channel)
        v = await stub.version(cri.VersionRequest(), timeout=PROBE_TIMEOUT)
        st = await stub.status(cri.StatusRequest(), timeout=PROBE_TIMEOUT)
    except (GRPCError, OSError, TimeoutError) as e:
        return [_fail("daemon", f"shimd at {cfg.daemon.socket} does not answer: {e}",
                      "journalctl -u shimd; restart it")]
    finally:
        channel.close()
    out = [_ok("daemon", f"{v.runtime_name} {v.runtime_version} answers on {cfg.daemon.socket}")]
    for c in st.status.conditions:
        if c.status:
            out.append(_ok("daemon", f"{c.type}"))
        else:
            out.append(_fail("daemon", f"{c.type} is false: {c.reason}: {c.message}"))
    return out


# --- driver -------------------------------------------------------------------------------------

async def run_checks(cfg: config.Config, kubelet_config: Path = KUBELET_CONFIG,
                     probe_daemon: bool = True) -> list[Finding]:
    findings = [_ok("config", f"{cfg.source}: {len(cfg.handlers)} handlers, default {cfg.daemon.default_handler!r}")]
    findings += check_host()
    findings += await asyncio.to_thread(check_cgroups, cfg, kubelet_config)
    handler_results = await asyncio.gather(*(check_handler(cfg, h) for h in cfg.handlers.values()))
    for res in handler_results:
        findings += res
    findings += await asyncio.to_thread(check_pause)
    findings += await asyncio.to_thread(check_cni, cfg)
    findings += check_streaming(cfg)
    findings += await asyncio.to_thread(check_storage, cfg)
    findings += await asyncio.to_thread(check_socket_file, cfg)
    findings += await asyncio.to_thread(check_records, cfg)
    if probe_daemon:
        findings += await check_running(cfg)
    return findings


def render(findings: Iterable[Finding]) -> str:
    marks = {OK: "  ok ", WARN: "WARN ", FAIL: "FAIL "}
    lines = []
    for f in findings:
        lines.append(f"{marks[f.level]} {f.area:<16} {f.message}")
        if f.fix and f.level != OK:
            lines.append(f"{'':22}fix: {f.fix}")
    return "\n".join(lines)


def exit_code(findings: Iterable[Finding]) -> int:
    return 1 if any(f.level == FAIL for f in findings) else 0


def to_json(findings: Iterable[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings], indent=2)
