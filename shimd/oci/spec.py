"""Builds the OCI runtime spec (config.json) of a container from its CRI config and image config.

Pure functions of their inputs: no I/O except reading the image's /etc/passwd and /etc/group and
stat()ing device nodes, so the merge rules can be unit-tested.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import resource
import stat
from dataclasses import dataclass, field
from typing import Any

import betterproto

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.oci import seccomp
from shimproto.messages import START_ON_CREATE_ANNOTATION

OCI_VERSION = "1.0.2"

# containerd's default capability set for non-privileged containers.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

ALL_CAPS = [
    "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_AUDIT_WRITE", "CAP_BLOCK_SUSPEND", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE", "CAP_LINUX_IMMUTABLE", "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW",
    "CAP_PERFMON", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT", "CAP_SYS_MODULE", "CAP_SYS_NICE", "CAP_SYS_PACCT", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_SYSLOG", "CAP_WAKE_ALARM",
]

# For a client that sends none (crictl). kubelet (1.36) sends its own: this list, and each CPU's
# thermal_throttle directory where the node has one.
DEFAULT_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/interrupts", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
DEFAULT_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

_PROPAGATION = {
    cri.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@dataclass
class PodContext:
    """What a container needs to know about its pod."""

    pod_id: str
    name: str
    namespace: str
    uid: str
    hostname: str
    namespaces: dict[str, str]  # kind -> pinned path; missing kind = host namespace
    pid_ns_path: str = ""  # the pause task's PID namespace when the pod shares one
    files: dict[str, str] = field(default_factory=dict)  # /etc/hosts etc. -> host file
    shm_path: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    cgroups_path: str = ""
    privileged_pod: bool = False
    userns: IdMappings | None = None  # the pod's user namespace (pinned at namespaces["user"])


@dataclass
class ImageContext:
    name: str
    config: dict[str, Any]  # the "config" object of the OCI image config
    layers: list[str]  # snapshot dirs, top-most first (to look up /etc/passwd)


@functools.cache
def host_min_oom_score_adj() -> int:
    """Without CAP_SYS_RESOURCE a process cannot go below its parent's value (read once: /proc/self reads
    cost ~1-3 ms each on CreateContainer's path under load, py-spy on bench_pod_start)."""
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return -1000


def _nofile_limit() -> int:
    """Raising RLIMIT_NOFILE above our own hard limit needs CAP_SYS_RESOURCE, which hosts may drop."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)


def _env_list(image_env: list[str], envs: list[cri.KeyValue]) -> list[str]:
    merged: dict[str, str] = {}
    for item in image_env:
        k, _, v = item.partition("=")
        merged[k] = v
    for kv in envs:
        merged[kv.key] = kv.value.decode("utf-8", "replace") if isinstance(kv.value, bytes) else str(kv.value)
    return [f"{k}={v}" for k, v in merged.items()]


def process_args(config: cri.ContainerConfig, image_cfg: dict[str, Any]) -> list[str]:
    """kubelet's rule: command replaces the entrypoint (and drops the image Cmd); args replace Cmd."""
    entrypoint = list(image_cfg.get("Entrypoint") or [])
    cmd = list(image_cfg.get("Cmd") or [])
    if config.command:
        entrypoint, cmd = list(config.command), list(config.args)
    elif config.args:
        cmd = list(config.args)
    args = entrypoint + cmd
    if not args:
        raise errors.InvalidArgument("config.command: no command specified and the image has no Entrypoint/Cmd")
    return args


MAX_USER_DB = 4 << 20   # /etc/passwd or /etc/group; the image chooses its size
_MAX_SYMLINKS = 40      # as the kernel's ELOOP limit
_MAX_STEPS = 4096       # path components walked in all, so link targets cannot make it long work


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _child(dirs: list[str], name: str) -> tuple[list[str], os.stat_result] | None:
    """`name` in the merged directory whose layers are `dirs` (top-most first), as overlayfs sees it:
    the top-most entry decides; a directory merges with the ones below it down to an opaque one."""
    for i, d in enumerate(dirs):
        path = os.path.join(d, name)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if _is_whiteout(st):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return [path], st
        merged = [path]
        if not _is_opaque(path):
            for lower in dirs[i + 1:]:
                lpath = os.path.join(lower, name)
                try:
                    lst = os.lstat(lpath)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if not stat.S_ISDIR(lst.st_mode):
                    break
                merged.append(lpath)
                if _is_opaque(lpath):
                    break
        return merged, st
    return None


def _resolve_in_layers(layers: list[str], rel: str) -> str | None:
    """Host path of `rel` in the image's merged rootfs, with every symlink resolved inside that
    rootfs (as openat2's RESOLVE_IN_ROOT: ".." and absolute targets stop at the image's root)."""
    pending = [p for p in rel.split("/") if p]
    pending.reverse()   # a stack: the next component is last
    cur: list[str] = []
    dirs = list(layers)
    links = steps = 0
    while pending:
        steps += 1
        if steps > _MAX_STEPS:
            return None
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            cur = cur[:-1]
            dirs = _walk(layers, cur)
            continue
        found = _child(dirs, name)
        if found is None:
            return None
        paths, st = found
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            target = os.readlink(paths[0])
            if target.startswith("/"):
                cur, dirs = [], list(layers)
            pending.extend(reversed([p for p in target.split("/") if p]))
            continue
        if not pending:
            return paths[0]
        if not stat.S_ISDIR(st.st_mode):
            return None
        cur.append(name)
        dirs = paths
    return None


def _walk(layers: list[str], comps: list[str]) -> list[str]:
    """The merged directory at `comps`, components already known to be directories."""
    dirs = list(layers)
    for name in comps:
        found = _child(dirs, name)
        if found is None:
            return []
        dirs = found[0]
    return dirs


def _read_db(layers: list[str], rel: str) -> list[list[str]]:
    """Lines of the image's /etc/passwd or /etc/group; blocking (callers run the spec build in a thread)."""
    try:
        path = _resolve_in_layers(layers, rel)
        if path is None:
            return []
        # O_NONBLOCK: a FIFO must not hang the open; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return []
        data = b""
        while len(data) <= MAX_USER_DB:
            chunk = os.read(fd, MAX_USER_DB + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        return []
    finally:
        os.close(fd)
    if len(data) > MAX_USER_DB:
        raise errors.InvalidArgument(f"image.image: the image's /{rel} is larger than {MAX_USER_DB} bytes")
    text = data.decode(errors="replace")
    return [line.split(":") for line in text.splitlines() if line and line[0] != "#"]


def resolve_user(sc: cri.LinuxContainerSecurityContext, image_user: str, layers: list[str]) -> dict[str, Any]:
    """uid/gid/additional gids from the security context, else the image's User, with name lookups."""
    passwd = _read_db(layers, "etc/passwd")
    groups = _read_db(layers, "etc/group")
    username = ""
    uid: int | None = None
    gid: int | None = None
    if betterproto.serialized_on_wire(sc.run_as_user):
        uid = sc.run_as_user.value
        if not 0 <= uid < 2**32 - 1:
            raise errors.InvalidArgument(f"linux.security_context.run_as_user {uid} is out of range")
    elif sc.run_as_username:
        username = sc.run_as_username
    elif image_user:
        user_part, _, group_part = image_user.partition(":")
        if user_part.isdigit():
            uid = int(user_part)
        else:
            username = user_part
        if group_part:
            if group_part.isdigit():
                gid = int(group_part)
            else:
                match = next((g for g in groups if g[0] == group_part and len(g) > 2), None)
                if match is None:
                    raise errors.InvalidArgument(f"image user group {group_part!r} not found in /etc/group")
                gid = int(match[2])
    if username:
        entry = next((p for p in passwd if p[0] == username and len(p) > 3), None)
        if entry is None:
            raise errors.InvalidArgument(f"user {username!r} not found in the image's /etc/passwd")
        uid = int(entry[2])
        if gid is None:
            gid = int(entry[3])
    if uid is None:
        uid = 0
    if gid is None:
        entry = next((p for p in passwd if len(p) > 3 and p[2] == str(uid)), None)
        gid = int(entry[3]) if entry else 0
        if not username and entry:
            username = entry[0]
    if betterproto.serialized_on_wire(sc.run_as_group):
        gid = sc.run_as_group.value
        if not 0 <= gid < 2**32 - 1:
            raise errors.InvalidArgument(f"linux.security_context.run_as_group {gid} is out of range")
    extra: list[int] = []
    # Strict: only the groups kubelet names; Merge (default): also the image's /etc/group memberships.
    if username and sc.supplemental_groups_policy != cri.SupplementalGroupsPolicy.Strict:
        extra = [int(g[2]) for g in groups if len(g) > 3 and username in g[3].split(",") and g[2].isdigit()]
    for i, g in enumerate(sc.supplemental_groups):
        if not 0 <= g < 2**32 - 1:
            raise errors.InvalidArgument(f"linux.security_context.supplemental_groups[{i}] {g} is out of range")
    extra += [int(g) for g in sc.supplemental_groups]
    # The primary group is a supplementary group too (as containerd and CRI-O do): setgroups() replaces the
    # whole list, and without it `id` and access checks on group-owned files miss the primary gid.
    user: dict[str, Any] = {"uid": uid, "gid": gid,
                            "additionalGids": [gid, *sorted({g for g in extra if g != gid})]}
    return user


# Bit numbers from linux/capability.h, to compare with what this host lets shimd hold.
CAP_NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}


@functools.cache
def host_caps() -> frozenset[str]:
    """Capabilities in shimd's own bounding set: a container can get no others (hosts may drop some).
    Read once: a bounding set only ever shrinks, and shimd drops none."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapBnd:"))
        mask = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return frozenset(ALL_CAPS)
    return frozenset(name for name, bit in CAP_NUMBERS.items() if mask >> bit & 1)


def _capabilities(sc: cri.LinuxContainerSecurityContext, held: frozenset[str] | set[str] | None = None) -> list[str]:
    held = host_caps() if held is None else held
    if sc.privileged:
        return [c for c in ALL_CAPS if c in held]
    caps = list(DEFAULT_CAPS)

    def norm(c: str) -> str:
        c = c.upper()
        return c if c.startswith("CAP_") else f"CAP_{c}"

    add = [norm(c) for c in sc.capabilities.add_capabilities]
    drop = [norm(c) for c in sc.capabilities.drop_capabilities]
    for c in add + drop:
        if c != "CAP_ALL" and c not in ALL_CAPS:
            raise errors.InvalidArgument(f"linux.security_context.capabilities: unknown capability {c!r}")
    for c in add:
        if c != "CAP_ALL" and c not in held:
            raise errors.InvalidArgument(f"linux.security_context.capabilities.add_capabilities: {c} is not "
                                         "available on this host (missing from shimd's bounding set)")
    if "CAP_ALL" in add:
        caps = [c for c in ALL_CAPS if c in held]
    else:
        caps += [c for c in add if c not in caps]
    if "CAP_ALL" in drop:
        caps = [c for c in add if c != "CAP_ALL"]
    else:
        caps = [c for c in caps if c not in drop]
    return [c for c in caps if c in held]


def _base_mounts(privileged: bool, readonly_rootfs: bool, pod: PodContext) -> list[dict[str, Any]]:
    sys_opts = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])},
    ]
    if pod.shm_path:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": pod.shm_path,
                       "options": ["rbind", "nosuid", "nodev", "noexec"]})
    elif "ipc" not in pod.namespaces and "network" in pod.namespaces:
        # Host IPC namespace: POSIX shared memory lives in the host's /dev/shm.
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": "/dev/shm",
                       "options": ["rbind", "nosuid", "nodev", "noexec"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    for dest, src in pod.files.items():
        opts = ["rbind", "rprivate"] + (["ro"] if readonly_rootfs else [])
        mounts.append({"destination": dest, "type": "bind", "source": src, "options": opts})
    return mounts


def is_image_mount(m: cri.Mount) -> bool:
    """A CRI image volume (kubelet's ImageVolume): the mount names an image instead of a host path."""
    return betterproto.serialized_on_wire(m.image) and bool(m.image.image)


def _user_mounts(config: cri.ContainerConfig, image_sources: dict[int, str]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(config.mounts):
        if not m.container_path.startswith("/"):
            raise errors.InvalidArgument(f"mounts[{i}].container_path must be absolute, got {m.container_path!r}")
        if is_image_mount(m):
            if i not in image_sources:
                raise errors.InvalidArgument(f"mounts[{i}].image {m.image.image!r} has not been prepared")
            # The image's read-only view, never shared with the host; exec stays allowed (as containerd).
            out.append({"destination": m.container_path, "type": "bind", "source": image_sources[i],
                        "options": ["rbind", "rprivate", "ro", "nosuid", "nodev"]})
            continue
        if not m.host_path.startswith("/"):
            raise errors.InvalidArgument(f"mounts[{i}].host_path must be absolute, got {m.host_path!r}")
        opts = ["rbind", _PROPAGATION.get(m.propagation, "rprivate")]
        opts.append("ro" if m.readonly else "rw")
        if m.recursive_read_only:
            # runc makes every submount read-only too (mount_setattr with AT_RECURSIVE).
            opts.append("rro")
        out.append({"destination": m.container_path, "type": "bind", "source": m.host_path, "options": opts})
    return out


def rootfs_propagation(config: cri.ContainerConfig) -> str | None:
    """A shared or slave bind mount only propagates if the container's root mount does too: with
    runc's default (rslave) a mount made inside a Bidirectional volume would never reach the host."""
    modes = {m.propagation for m in config.mounts if not is_image_mount(m)}
    if cri.MountPropagation.PROPAGATION_BIDIRECTIONAL in modes:
        return "rshared"
    if cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER in modes:
        return "rslave"
    return None


def _devices(config: cri.ContainerConfig, privileged: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    devices: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    if privileged:
        rules = [{"allow": True, "access": "rwm"}]
    for i, d in enumerate(config.devices):
        try:
            st = os.stat(d.host_path)
        except OSError as e:
            raise errors.InvalidArgument(f"devices[{i}].host_path {d.host_path!r}: {e.strerror}") from None
        if stat.S_ISCHR(st.st_mode):
            kind = "c"
        elif stat.S_ISBLK(st.st_mode):
            kind = "b"
        else:
            raise errors.InvalidArgument(f"devices[{i}].host_path {d.host_path!r} is not a device node")
        perms = d.permissions or "rwm"
        if set(perms) - set("rwm"):
            raise errors.InvalidArgument(f"devices[{i}].permissions must use r, w, m; got {perms!r}")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        devices.append({"path": d.container_path or d.host_path, "type": kind, "major": major, "minor": minor,
                        "fileMode": stat.S_IMODE(st.st_mode), "uid": 0, "gid": 0})
        rules.append({"allow": True, "type": kind, "major": major, "minor": minor, "access": perms})
    return devices, rules


_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_PAGE_SIZE = re.compile(r"^\d+(KB|MB|GB|TB)$")
_UNIFIED_KEY = re.compile(r"^[a-z][a-z0-9_]*\.[a-z0-9_.]+$")
# Beyond these a value is a typo or an overflow, not a limit anyone means.
MAX_MEMORY = 1 << 60
MAX_QUOTA = 1 << 44


def validate_resources(res: cri.LinuxContainerResources, field: str = "linux.resources") -> None:
    """Kernel and runc ranges, so a bad value fails the RPC instead of the container start or update."""
    def bad(name: str, why: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"{field}.{name} {why}")

    if res.cpu_period and not 1000 <= res.cpu_period <= 1_000_000:
        raise bad("cpu_period", f"must be 0 or within [1000, 1000000] microseconds, got {res.cpu_period}")
    if res.cpu_quota not in (0, -1) and not 1000 <= res.cpu_quota <= MAX_QUOTA:
        raise bad("cpu_quota", f"must be -1, 0 or within [1000, {MAX_QUOTA}] microseconds, got {res.cpu_quota}")
    if res.cpu_shares and not 2 <= res.cpu_shares <= 262144:
        raise bad("cpu_shares", f"must be 0 or within [2, 262144], got {res.cpu_shares}")
    if res.memory_limit_in_bytes and not 4096 <= res.memory_limit_in_bytes <= MAX_MEMORY:
        raise bad("memory_limit_in_bytes", f"must be 0 or within [4096, {MAX_MEMORY}], got {res.memory_limit_in_bytes}")
    swap = res.memory_swap_limit_in_bytes
    if swap not in (0, -1):
        if not 4096 <= swap <= MAX_MEMORY:
            raise bad("memory_swap_limit_in_bytes", f"must be -1, 0 or within [4096, {MAX_MEMORY}], got {swap}")
        if res.memory_limit_in_bytes and swap < res.memory_limit_in_bytes:
            raise bad("memory_swap_limit_in_bytes", f"({swap}) must not be below memory_limit_in_bytes "
                      f"({res.memory_limit_in_bytes}): it is the memory+swap limit")
    if not -1000 <= res.oom_score_adj <= 1000:
        raise bad("oom_score_adj", f"must be in [-1000, 1000], got {res.oom_score_adj}")
    for name, value in (("cpuset_cpus", res.cpuset_cpus), ("cpuset_mems", res.cpuset_mems)):
        if value and not _CPUSET.match(value.replace(" ", "")):
            raise bad(name, f"{value!r} is not a list of numbers and ranges like 0-3,5")
        for part in value.split(","):
            lo, _, hi = part.partition("-")
            if hi and lo.strip().isdigit() and hi.strip().isdigit() and int(hi) < int(lo):
                raise bad(name, f"{value!r} has a descending range {part!r}")
    for i, h in enumerate(res.hugepage_limits):
        if not _PAGE_SIZE.match(h.page_size):
            raise bad(f"hugepage_limits[{i}].page_size", f"{h.page_size!r} must look like 2MB or 1GB")
    for k, v in res.unified.items():
        if not _UNIFIED_KEY.match(k) or ".." in k:
            raise bad("unified", f"key {k!r} is not a cgroup interface file name")
        if "\n" in v:
            raise bad("unified", f"value of {k!r} must be a single line")


def merge_resources(old: cri.LinuxContainerResources | None,
                    new: cri.LinuxContainerResources) -> cri.LinuxContainerResources:
    """An update replaces what it sets; fields it leaves unset keep their current values (as containerd)."""
    out = cri.LinuxContainerResources().from_dict(old.to_dict()) if old is not None else cri.LinuxContainerResources()
    for name in ("cpu_period", "cpu_quota", "cpu_shares", "memory_limit_in_bytes", "memory_swap_limit_in_bytes",
                 "oom_score_adj", "cpuset_cpus", "cpuset_mems"):
        value = getattr(new, name)
        if value:
            setattr(out, name, value)
    if new.hugepage_limits:
        out.hugepage_limits = list(new.hugepage_limits)
    if new.unified:
        out.unified = {**out.unified, **new.unified}
    return out


def resources(res: cri.LinuxContainerResources | None, min_oom: int,
              hugetlb: bool = True) -> tuple[dict[str, Any], int | None]:
    """OCI linux.resources and the clamped oom_score_adj. hugetlb: whether the host's hugetlb controller is
    usable; kubelet sends hugepage limits (0 for every page size) either way, and runc fails on them without it."""
    out: dict[str, Any] = {}
    if res is None or not betterproto.serialized_on_wire(res):
        return out, None
    validate_resources(res)
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    mem: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        mem["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        mem["swap"] = res.memory_swap_limit_in_bytes
    if mem:
        out["memory"] = mem
    if res.hugepage_limits and hugetlb:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(res.unified)
    return out, max(res.oom_score_adj, min_oom)


# Sysctls isolated by a namespace, and which namespace (kubelet's list of namespaced sysctls).
_IPC_SYSCTLS = ("kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced", "kernel.msgmax",
                "kernel.msgmnb", "kernel.msgmni", "kernel.sem")
_SYSCTL_NAME = re.compile(r"^[a-z0-9_]+([./][a-z0-9_\-]+)+$")


def sysctl_namespace(name: str) -> str | None:
    """'ipc', 'network', 'uts' or None when the sysctl is host-wide."""
    name = name.replace("/", ".")
    if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
        return "ipc"
    if name.startswith("net."):
        return "network"
    if name in ("kernel.hostname", "kernel.domainname"):
        return "uts"
    return None


def validate_sysctls(sysctls: dict[str, str], private: set[str], field: str = "linux.sysctls") -> None:
    """Only namespaced sysctls, and only when the pod has its own namespace of that kind."""
    for name, value in sysctls.items():
        if not _SYSCTL_NAME.match(name):
            raise errors.InvalidArgument(f"{field}: {name!r} is not a sysctl name")
        if "\n" in value or "\x00" in value:
            raise errors.InvalidArgument(f"{field}[{name!r}]: value must be a single line")
        kind = sysctl_namespace(name)
        if kind is None:
            raise errors.InvalidArgument(f"{field}: {name!r} is not namespaced; it would change the host")
        if kind not in private:
            raise errors.InvalidArgument(f"{field}: {name!r} needs the pod's own {kind} namespace, "
                                         "but the pod uses the host's")


def apparmor_supported() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def _legacy_profile(value: str, field: str,
                    runtime_default: tuple[str, ...]) -> tuple[cri.SecurityProfileProfileType, str]:
    """The deprecated string form of a seccomp/AppArmor profile: runtime/default, unconfined, localhost/<ref>."""
    if value in runtime_default:
        return cri.SecurityProfileProfileType.RuntimeDefault, ""
    if value == "unconfined":
        return cri.SecurityProfileProfileType.Unconfined, ""
    if value.startswith("localhost/"):
        return cri.SecurityProfileProfileType.Localhost, value[len("localhost/"):]
    raise errors.InvalidArgument(f"{field}: unknown profile {value!r}")


def _seccomp(sc: cri.LinuxContainerSecurityContext, caps: list[str], privileged: bool) -> dict[str, Any] | None:
    field = "linux.security_context.seccomp"
    if betterproto.serialized_on_wire(sc.seccomp):
        kind, ref = sc.seccomp.profile_type, sc.seccomp.localhost_ref
    elif sc.seccomp_profile_path:  # the deprecated string form
        field = "linux.security_context.seccomp_profile_path"
        kind, ref = _legacy_profile(sc.seccomp_profile_path, field, ("runtime/default", "docker/default"))
    else:
        return None  # kubelet sends nothing for Unconfined
    if kind == cri.SecurityProfileProfileType.Localhost:
        if not ref:
            raise errors.InvalidArgument(f"{field}.localhost_ref must name a profile file")
        profile = seccomp.load_localhost(ref, field, caps)  # validated even for privileged containers
        return None if privileged else profile
    if privileged or kind == cri.SecurityProfileProfileType.Unconfined:
        return None
    return seccomp.default_profile(caps)


def _apparmor(sc: cri.LinuxContainerSecurityContext, privileged: bool) -> str | None:
    field = "linux.security_context.apparmor"
    if betterproto.serialized_on_wire(sc.apparmor):
        kind, ref = sc.apparmor.profile_type, sc.apparmor.localhost_ref
    elif sc.apparmor_profile:
        field = "linux.security_context.apparmor_profile"
        kind, ref = _legacy_profile(sc.apparmor_profile, field, ("runtime/default",))
    else:
        return None
    if kind != cri.SecurityProfileProfileType.Localhost:
        # shimd ships no AppArmor profile of its own; without AppArmor on the host there is nothing to apply.
        return None
    if not ref:
        raise errors.InvalidArgument(f"{field}.localhost_ref must name a loaded profile")
    if not apparmor_supported():
        raise errors.InvalidArgument(f"{field}: profile {ref!r} requested but AppArmor is not enabled on this host")
    return None if privileged else ref


CTR_USERNS_FIELD = "linux.security_context.namespace_options.userns_options"
POD_USERNS_FIELD = "config.linux.security_context.namespace_options.userns_options"
_ID_LIMIT = 2**32 - 1  # (uid_t)-1 is never a valid id
_MAX_MAP_LINES = 340  # the kernel's limit of lines in uid_map/gid_map


@dataclass(frozen=True)
class IdMappings:
    """A user namespace's uid and gid mappings, in OCI form (containerID, hostID, size)."""

    uids: tuple[tuple[int, int, int], ...]
    gids: tuple[tuple[int, int, int], ...]

    def oci(self, kind: str) -> list[dict[str, int]]:
        maps = self.uids if kind == "uids" else self.gids
        return [{"containerID": c, "hostID": h, "size": n} for c, h, n in maps]

    def host_root(self) -> tuple[int, int] | None:
        """The host uid and gid that container root maps to, when it is mapped."""
        uid = next((h for c, h, _ in self.uids if c == 0), None)
        gid = next((h for c, h, _ in self.gids if c == 0), None)
        return None if uid is None or gid is None else (uid, gid)


def _id_ranges(maps: list[cri.IdMapping], field: str) -> tuple[tuple[int, int, int], ...]:
    if not maps:
        raise errors.InvalidArgument(f"{field} must not be empty in POD mode")
    if len(maps) > _MAX_MAP_LINES:
        raise errors.InvalidArgument(f"{field} has {len(maps)} ranges, more than the kernel's {_MAX_MAP_LINES}")
    ranges = []
    for i, m in enumerate(maps):
        if m.length == 0 or m.host_id + m.length > _ID_LIMIT or m.container_id + m.length > _ID_LIMIT:
            raise errors.InvalidArgument(f"{field}[{i}] has an empty or overflowing range")
        ranges.append((m.container_id, m.host_id, m.length))
    # The kernel refuses overlapping ranges on either side when the map is written.
    for side in (0, 1):
        spans = sorted((r[side], r[side] + r[2]) for r in ranges)
        if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            raise errors.InvalidArgument(f"{field} has overlapping ranges")
    return tuple(ranges)


def user_namespace(ns: cri.NamespaceOption, field: str) -> IdMappings | None:
    """The mappings when kubelet asks for a pod user namespace (hostUsers: false); None for the host's."""
    if not betterproto.serialized_on_wire(ns) or not betterproto.serialized_on_wire(ns.userns_options):
        return None
    u = ns.userns_options
    if u.mode == cri.NamespaceMode.NODE:
        return None
    if u.mode != cri.NamespaceMode.POD:
        raise errors.InvalidArgument(f"{field}.mode must be NODE or POD, got {getattr(u.mode, 'name', u.mode)}")
    return IdMappings(uids=_id_ranges(list(u.uids), f"{field}.uids"), gids=_id_ranges(list(u.gids), f"{field}.gids"))


def _container_userns(sc: cri.LinuxContainerSecurityContext, pod: PodContext) -> IdMappings | None:
    """The container must run in its pod's user namespace exactly when the pod has one."""
    userns = user_namespace(sc.namespace_options, CTR_USERNS_FIELD)
    if userns is None and pod.userns is not None:
        raise errors.InvalidArgument(f"{CTR_USERNS_FIELD}: the pod sandbox has a user namespace; the container "
                                     "must ask for it (mode POD, the pod's mappings)")
    if userns is not None and pod.userns is None:
        raise errors.InvalidArgument(f"{CTR_USERNS_FIELD}: the pod sandbox has no user namespace (it was not "
                                     "created with userns_options mode POD)")
    if userns is not None and userns != pod.userns:
        raise errors.InvalidArgument(f"{CTR_USERNS_FIELD}: the mappings differ from the pod sandbox's")
    if userns is not None and sc.namespace_options.pid == cri.NamespaceMode.NODE:
        raise errors.InvalidArgument("linux.security_context.namespace_options.pid: NODE cannot be combined "
                                     "with a user namespace")
    return userns


def _join_user_ns(linux: dict[str, Any], pod: PodContext, userns: IdMappings) -> None:
    """Join the pod's pinned user namespace by path; runc 1.1 still wants the mappings to resolve ids."""
    linux["namespaces"].append({"type": "user", "path": pod.namespaces["user"]})
    linux["uidMappings"], linux["gidMappings"] = userns.oci("uids"), userns.oci("gids")


def _host_devices() -> list[dict[str, Any]]:
    """Every device node of the host, for privileged containers (as containerd and Docker do)."""
    found: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk("/dev"):
        # pts and shm are mounted separately; mqueue holds no devices.
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in ("/dev/pts", "/dev/shm", "/dev/mqueue")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode):
                kind = "c"
            elif stat.S_ISBLK(st.st_mode):
                kind = "b"
            else:
                continue
            if path == "/dev/console":
                continue  # runc sets up its own console
            found.append({"path": path, "type": kind, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
                          "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid})
    return found


def _namespaces(sc: cri.LinuxContainerSecurityContext, pod: PodContext) -> list[dict[str, Any]]:
    ns: list[dict[str, Any]] = [{"type": "mount"}]
    for kind in ("network", "ipc", "uts"):
        if kind in pod.namespaces:
            ns.append({"type": kind, "path": pod.namespaces[kind]})
    # CRI's zero value is POD: a client that says nothing shares the pod's PID namespace (as containerd does).
    pid_mode = sc.namespace_options.pid
    if pid_mode == cri.NamespaceMode.POD and pod.pid_ns_path:
        ns.append({"type": "pid", "path": pod.pid_ns_path})
    elif pid_mode == cri.NamespaceMode.TARGET:
        raise errors.InvalidArgument("linux.security_context.namespace_options.pid: TARGET is not supported")
    elif pid_mode != cri.NamespaceMode.NODE:
        ns.append({"type": "pid"})
    return ns


def container_spec(container_id: str, config: cri.ContainerConfig, pod: PodContext, image: ImageContext,
                   rootfs: str, min_oom: int | None = None,
                   image_sources: dict[int, str] | None = None, hugetlb: bool = True) -> dict[str, Any]:
    """image_sources: for each image volume (by index in config.mounts), the host path to bind."""
    linux_cfg = config.linux if betterproto.serialized_on_wire(config.linux) else cri.LinuxContainerConfig()
    # Not `or`: a message whose fields are all defaults is falsy, yet its presence matters (seccomp RuntimeDefault).
    sc = linux_cfg.security_context
    privileged = sc.privileged
    if privileged and not pod.privileged_pod:
        raise errors.InvalidArgument("linux.security_context.privileged: the pod sandbox is not privileged")
    img = image.config
    env = _env_list(list(img.get("Env") or []), config.envs)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if config.tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    env.append(f"HOSTNAME={pod.hostname}")
    caps = _capabilities(sc)
    res, oom = resources(linux_cfg.resources, host_min_oom_score_adj() if min_oom is None else min_oom, hugetlb)
    devices, dev_rules = _devices(config, privileged)
    if privileged:
        user_paths = {d["path"] for d in devices}
        devices = [d for d in _host_devices() if d["path"] not in user_paths] + devices
    res["devices"] = dev_rules
    validate_sysctls(pod.sysctls, set(pod.namespaces))
    seccomp_profile = _seccomp(sc, caps, privileged)
    apparmor_profile = _apparmor(sc, privileged)
    userns = _container_userns(sc, pod)
    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": resolve_user(sc, str(img.get("User") or ""), image.layers),
        "args": process_args(config, img),
        "env": env,
        "cwd": config.working_dir or img.get("WorkingDir") or "/",
        "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
        "noNewPrivileges": sc.no_new_privs,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": _nofile_limit(), "soft": _nofile_limit()}],
    }
    if oom is not None:
        process["oomScoreAdj"] = oom
    if apparmor_profile:
        process["apparmorProfile"] = apparmor_profile
    mounts = _base_mounts(privileged, sc.readonly_rootfs, pod)
    user_mounts = _user_mounts(config, image_sources or {})
    user_dests = {m["destination"] for m in user_mounts}
    mounts = [m for m in mounts if m["destination"] not in user_dests] + user_mounts
    linux: dict[str, Any] = {
        "namespaces": _namespaces(sc, pod),
        "resources": res,
        "cgroupsPath": pod.cgroups_path,
        "devices": devices,
    }
    if pod.sysctls:
        linux["sysctl"] = dict(pod.sysctls)
    if (propagation := rootfs_propagation(config)) is not None:
        linux["rootfsPropagation"] = propagation
    if seccomp_profile is not None:
        linux["seccomp"] = seccomp_profile
    if userns is not None:
        _join_user_ns(linux, pod, userns)
    if not privileged:
        linux["maskedPaths"] = list(sc.masked_paths) if sc.masked_paths else list(DEFAULT_MASKED)
        linux["readonlyPaths"] = list(sc.readonly_paths) if sc.readonly_paths else list(DEFAULT_READONLY)
    annotations = dict(config.annotations)
    annotations.update({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": config.metadata.name,
        "io.kubernetes.cri.sandbox-id": pod.pod_id,
        "io.kubernetes.cri.sandbox-name": pod.name,
        "io.kubernetes.cri.sandbox-namespace": pod.namespace,
        "io.kubernetes.cri.sandbox-uid": pod.uid,
        "io.kubernetes.cri.image-name": image.name,
        # StartContainer makes the task and starts it at once (CreateContainer only writes the bundle).
        START_ON_CREATE_ANNOTATION: "true",
    })
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": rootfs, "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }
    if "uts" in pod.namespaces:
        spec["hostname"] = pod.hostname
    return spec


def pause_spec(pod: PodContext, rootfs: str, args: list[str]) -> dict[str, Any]:
    """The infra process that holds a shared PID namespace (catatonit)."""
    ns: list[dict[str, Any]] = [{"type": "mount"}, {"type": "pid"}]
    for kind in ("network", "ipc", "uts"):
        if kind in pod.namespaces:
            ns.append({"type": kind, "path": pod.namespaces[kind]})
    linux: dict[str, Any] = {
        "namespaces": ns, "cgroupsPath": pod.cgroups_path,
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "maskedPaths": list(DEFAULT_MASKED), "readonlyPaths": list(DEFAULT_READONLY),
    }
    if pod.userns is not None:
        # The pause task owns the shared PID namespace: it must be created inside the pod's user namespace.
        _join_user_ns(linux, pod, pod.userns)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False, "user": {"uid": 65535, "gid": 65535}, "args": args, "cwd": "/",
            "env": ["PATH=/"], "noNewPrivileges": True,
            "capabilities": {k: [] for k in ("bounding", "effective", "permitted")},
        },
        "root": {"path": rootfs, "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        ],
        "annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": pod.pod_id,
                        "io.kubernetes.cri.sandbox-name": pod.name,
                        "io.kubernetes.cri.sandbox-namespace": pod.namespace,
                        "io.kubernetes.cri.sandbox-uid": pod.uid,
                        # RunPodSandbox starts the pause task right after making it.
                        START_ON_CREATE_ANNOTATION: "true"},
        "linux": linux,
        **({"hostname": pod.hostname} if "uts" in pod.namespaces else {}),
    }
