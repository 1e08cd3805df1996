"""What runc's own state says of a container, for the runc shim's shortcuts that do runc's work without
a runc process (reaped_delete.py, cgroup_kill.py): each is taken only for runc itself, with its
cgroupfs driver and the state layout runc 1.1 writes, and otherwise leaves the work to runc."""

from __future__ import annotations

import json
import os

from shims.runc import cgroupfs


def plain_runc(binary: str, systemd_cgroup: bool) -> bool:
    """runc itself (not runsc or another OCI runtime) with its cgroupfs driver."""
    return os.path.basename(binary) == "runc" and not systemd_cgroup


def cgroup_paths(root: str, cid: str) -> tuple[dict[str, str], str]:
    """The container's cgroup by controller from runc's state.json, and "" or why it cannot be used:
    only runc's plain cgroupfs layout (no Intel RDT, not rootless), every path under a cgroup mount."""
    if not cid or "/" in cid or cid in (".", ".."):
        return {}, f"container id {cid!r} is not a plain name"
    try:
        with open(os.path.join(root, cid, "state.json"), "rb") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return {}, f"runc state unreadable: {e}"
    paths = state.get("cgroup_paths") if isinstance(state, dict) else None
    if not isinstance(paths, dict) or state.get("intel_rdt_path") or state.get("rootless"):
        return {}, "runc state is not the plain cgroupfs layout"
    mounts = [point for point, _, _ in cgroupfs.mounts()]
    for p in paths.values():
        if not (isinstance(p, str) and os.path.normpath(p) == p
                and any(p.startswith(m + "/") for m in mounts)):
            return {}, f"cgroup path {p!r} is not under a cgroup mount"
    return paths, ""
