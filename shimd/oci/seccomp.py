"""Seccomp profiles for OCI specs: shimd's RuntimeDefault profile and Localhost profile loading.

The default profile allows every system call except a deny list of calls that either reach
host-global kernel state (modules, clocks, swap, reboot, accounting, keyrings), break namespace
isolation (mount, namespace creation and joining, handle-based opens), or are rarely needed and
historically exploitable (bpf, userfaultfd, perf events, ptrace-like memory access). A call whose
legitimate use depends on a capability is only denied when the container lacks that capability,
so granting e.g. CAP_SYS_TIME to a container also lets it call settimeofday.

Unknown system calls (not yet known to the runtime's libseccomp) are skipped by runc, so listing
newer calls is harmless on older hosts.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from shimd import errors

EPERM = 1
ENOSYS = 38

# (syscalls, the capability that makes them legitimate or "" if none does)
_DENY: list[tuple[tuple[str, ...], str]] = [
    # Host-global state.
    (("init_module", "finit_module", "delete_module", "create_module", "query_module", "get_kernel_syms"),
     "CAP_SYS_MODULE"),
    (("kexec_load", "kexec_file_load", "reboot"), "CAP_SYS_BOOT"),
    (("settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex"),
     "CAP_SYS_TIME"),
    (("acct",), "CAP_SYS_PACCT"),
    (("iopl", "ioperm"), "CAP_SYS_RAWIO"),
    (("syslog",), "CAP_SYSLOG"),
    (("swapon", "swapoff", "quotactl", "quotactl_fd", "lookup_dcookie", "nfsservctl", "sysfs", "_sysctl",
      "ustat", "uselib", "vhangup", "pivot_root", "mount", "umount", "umount2", "mount_setattr", "move_mount",
      "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "setns", "unshare", "name_to_handle_at"),
     "CAP_SYS_ADMIN"),
    (("open_by_handle_at",), "CAP_DAC_READ_SEARCH"),
    # Kernel keyrings are not namespaced.
    (("add_key", "request_key", "keyctl"), ""),
    # Process memory of other processes.
    (("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"), "CAP_SYS_PTRACE"),
    # NUMA policy moves memory on the host's behalf.
    (("mbind", "set_mempolicy", "migrate_pages", "move_pages", "set_mempolicy_home_node"), "CAP_SYS_NICE"),
    (("bpf",), "CAP_BPF"),
    (("perf_event_open",), "CAP_PERFMON"),
    (("userfaultfd",), ""),
    (("vm86", "vm86old"), ""),
]

# Namespace-creating clone(2) flags. clone3 passes flags in memory that seccomp cannot read, so it is
# answered ENOSYS (libc then falls back to clone, which is filtered by flag).
_CLONE_NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}

_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
    "ppc64le": ["SCMP_ARCH_PPC64LE"],
    "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
    "riscv64": ["SCMP_ARCH_RISCV64"],
}


def default_profile(caps: list[str], machine: str | None = None) -> dict[str, Any]:
    """shimd's RuntimeDefault profile for a container holding `caps` (OCI linux.seccomp)."""
    have = set(caps)
    denied: list[str] = []
    for names, cap in _DENY:
        if cap and cap in have:
            continue
        if cap == "CAP_BPF" and "CAP_SYS_ADMIN" in have:
            continue  # before CAP_BPF existed, CAP_SYS_ADMIN granted bpf
        if cap == "CAP_PERFMON" and "CAP_SYS_ADMIN" in have:
            continue
        denied.extend(names)
    syscalls: list[dict[str, Any]] = [
        {"names": sorted(set(denied)), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        # io_uring bypasses seccomp for the operations it performs; ENOSYS makes programs fall back to epoll/read.
        {"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ERRNO",
         "errnoRet": ENOSYS},
    ]
    if "CAP_SYS_ADMIN" not in have:
        syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
        # s390 swaps clone's first two arguments.
        arg = 1 if (machine or platform.machine()).startswith("s390") else 0
        for flag in _CLONE_NS_FLAGS.values():
            syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
                             "args": [{"index": arg, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _ARCHES.get(machine or platform.machine(), []),
        "syscalls": syscalls,
    }


_ACTIONS = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
            "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY"}


def _applies(entry: dict[str, Any], caps: set[str]) -> bool:
    """Docker-form entries may be conditional on capabilities."""
    inc = (entry.get("includes") or {}).get("caps") or []
    exc = (entry.get("excludes") or {}).get("caps") or []
    return set(inc) <= caps and not (set(exc) & caps)


def load_localhost(path: str, field: str, caps: list[str] | None = None) -> dict[str, Any]:
    """A Localhost profile: a JSON file on the host in OCI (or Docker) seccomp form."""
    if not os.path.isabs(path):
        raise errors.InvalidArgument(f"{field}: localhost profile path {path!r} must be absolute")
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        raise errors.InvalidArgument(f"{field}: seccomp profile {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise errors.InvalidArgument(f"{field}: cannot read seccomp profile {path!r}: {e}") from None
    if not isinstance(raw, dict) or raw.get("defaultAction") not in _ACTIONS:
        raise errors.InvalidArgument(f"{field}: seccomp profile {path!r} has no valid defaultAction")
    out: dict[str, Any] = {"defaultAction": raw["defaultAction"]}
    if "defaultErrnoRet" in raw:
        out["defaultErrnoRet"] = raw["defaultErrnoRet"]
    arches = list(raw.get("architectures") or [])
    # Docker's form lists architectures as archMap entries with sub-architectures.
    for m in raw.get("archMap") or []:
        if m.get("architecture") in _ARCHES.get(platform.machine(), []):
            arches += [m["architecture"], *(m.get("subArchitectures") or [])]
    if arches:
        out["architectures"] = sorted(set(arches))
    if raw.get("flags"):
        out["flags"] = list(raw["flags"])
    calls = []
    have = set(caps or [])
    for i, sc in enumerate(raw.get("syscalls") or []):
        if not _applies(sc, have):
            continue
        names = list(sc.get("names") or ([sc["name"]] if sc.get("name") else []))
        if not names or sc.get("action") not in _ACTIONS:
            raise errors.InvalidArgument(f"{field}: seccomp profile {path!r} syscalls[{i}] needs names and an action")
        entry: dict[str, Any] = {"names": names, "action": sc["action"]}
        for k in ("errnoRet", "args"):
            if sc.get(k) is not None:
                entry[k] = sc[k]
        calls.append(entry)
    if calls:
        out["syscalls"] = calls
    return out
