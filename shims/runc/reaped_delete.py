"""`runc delete --force` of a container whose init this shim has reaped, done without a runc process.

For a stopped container runc's delete kills whatever is left in the container's cgroup (possible only
when the container shares its PID namespace: the pod's init inherits its orphans), removes the cgroup
in every hierarchy (its sub-cgroups first, retrying while the kernel still counts an exiting task),
then its state directory; it would also tear down Intel RDT, stop a systemd scope and run poststop
hooks. Each `runc delete` is a Go start-up: 6-7 ms of CPU and wall on this machine (measured: python
timing of `runc delete` of a stopped container, RUSAGE_CHILDREN), on the path of every StopContainer
and pod teardown. The removal here takes a fraction of a millisecond.

It is taken only where the outcome is the same: no poststop hook, runc's cgroupfs driver, runc's own
state layout (state.json naming cgroup paths under this host's cgroup mounts, no Intel RDT, not
rootless), and no process left in the cgroup (always so with a PID namespace of its own: the kernel
ended every other process of the container with its init; read from cgroup.procs otherwise). Anything
else, or a cgroup that stays busy, returns the reason, and the caller runs `runc delete --force` after
all: runc is the reference for every case this does not cover. tests/integration/test_runc_shim.py
compares what is left with what `runc delete` leaves.
"""

from __future__ import annotations

import os

from shims.runc import cgroupfs, runc_state

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any


def spec_allows(spec: dict[str, Any], binary: str, systemd_cgroup: bool) -> bool:
    """Whether a container of this spec, run by this runtime binary, may be deleted here once reaped."""
    if not runc_state.plain_runc(binary, systemd_cgroup):
        return False
    return not (spec.get("hooks") or {}).get("poststop") and not (spec.get("linux") or {}).get("intelRdt")


def remove(root: str, cid: str, own_pid_ns: bool) -> str:
    """Removes the container's cgroups and runc state; "" when done, else why runc must do it.

    own_pid_ns: the init was PID 1 of a PID namespace of its own, so nothing of the container outlived it.
    """
    paths, why = runc_state.cgroup_paths(root, cid)
    if why:
        return why
    if not own_pid_ns and any(_has_processes(p) for p in set(paths.values())):
        return "processes are left in its cgroup"
    left = cgroupfs.remove(sorted(set(paths.values())))
    if left:
        return f"cgroups still busy: {left}"
    return _remove_state_dir(os.path.join(root, cid))


def _remove_state_dir(state_dir: str) -> str:
    """runc keeps plain files there (state.json, a fifo before start); shutil would cost every shim its import."""
    try:
        with os.scandir(state_dir) as entries:
            for e in entries:
                os.unlink(e.path)  # a directory in there is not runc 1.1's: IsADirectoryError
        os.rmdir(state_dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"runc state {state_dir} could not be removed: {e}"
    return ""


def _has_processes(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs"), "rb") as f:
            return bool(f.read(1))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # unknown: runc decides
