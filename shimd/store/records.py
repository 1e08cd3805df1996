"""What shimd remembers about each pod sandbox and container.

Records are frozen: a change is made on a copy through `Store.update_pod` / `Store.update_container`,
written, then swapped in, so a reader never sees a half-made change and memory never runs ahead of disk.
Their states and the legal changes between them are in shimd/store/lifecycle.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from shimd.store.lifecycle import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_INITIALIZING,
    POD_NOTREADY,
    POD_READY,
    POD_STOPPED,
)

__all__ = ["CONTAINER_CREATED", "CONTAINER_EXITED", "CONTAINER_RUNNING", "POD_INITIALIZING", "POD_NOTREADY",
           "POD_READY", "POD_STOPPED", "ContainerRecord", "PodRecord", "config_field"]


def config_field(config: dict[str, Any], *path: str, default: Any = None) -> Any:
    """One field of a stored CRI config (betterproto's to_dict form: camelCase keys, enums by name).

    Rebuilding the whole config message to read a field costs about half a millisecond, on paths
    kubelet calls per pod or per container.
    """
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _fields_dict(record: Any) -> dict[str, Any]:
    """The record's fields by name, what `dataclasses.asdict` gives without its deep copy: records are never
    changed in place (a change is a new record) and the store encodes this dict at once. asdict copies the
    CRI config value by value: 215 us for a container record like kubelet's against 1.6 (timeit), and a pod
    start writes four records (tests/unit/test_store_writes.py pins the two to each other)."""
    return {name: getattr(record, name) for name in record.__slots__}


@dataclass(frozen=True, slots=True)
class PodRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    handler: str
    created_at: int  # unix nanoseconds
    config: dict[str, Any]  # the CRI PodSandboxConfig as given
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    state: str = POD_INITIALIZING
    host_network: bool = False
    # kind -> pinned namespace path (network, ipc, uts); pid comes from the pause task when shared.
    namespaces: dict[str, str] = field(default_factory=dict)
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    network_attached: bool = False
    shim_address: str = ""
    shim_dead: bool = False
    # A sandbox task exists in the shim (pause process for a shared PID namespace, or a shim v2 sandbox).
    sandbox_task: bool = False
    sandbox_pid: int = 0
    cgroup_parent: str = ""
    owns_cgroup_parent: bool = False
    # Pod-level resources last given (UpdatePodSandboxResources): {"resources": {...}, "overhead": {...}}, CRI form.
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def name_key(self) -> str:
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"

    @property
    def ready(self) -> bool:
        return self.state == POD_READY

    @property
    def initializing(self) -> bool:
        """RunPodSandbox has not finished: recovery tears such a pod down instead of keeping it."""
        return self.state == POD_INITIALIZING

    @property
    def stopped(self) -> bool:
        return self.state == POD_STOPPED

    def to_dict(self) -> dict[str, Any]:
        d = _fields_dict(self)
        # Also in the flags a shimd before the explicit states kept, so a downgraded daemon reads it right.
        d["initializing"], d["stopped"] = self.initializing, self.stopped
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        # Records written before the explicit states: READY/NOTREADY plus two flags.
        if d.get("initializing") is True:
            fields["state"] = POD_INITIALIZING
        elif d.get("stopped") is True:
            fields["state"] = POD_STOPPED
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    id: str
    pod_id: str
    name: str
    attempt: int
    created_at: int
    config: dict[str, Any]  # the CRI ContainerConfig as given
    image_ref: str  # what the user asked for
    image_id: str
    log_path: str
    bundle: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    state: str = CONTAINER_CREATED
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    tty: bool = False
    stdin: bool = False
    # Where this container's writable layer lives (upper/work dirs), removed with it.
    fs_dir: str = ""
    mounts: list[dict[str, Any]] = field(default_factory=list)
    # Created from a checkpoint archive: the directory of its CRIU images, restored at start.
    restore_from: str = ""
    # The process's user as its OCI spec sets it (uid, gid, groups), for ContainerStatus.user;
    # empty in records of a shimd that did not keep it (recovery fills it in from the bundle).
    user: dict[str, Any] = field(default_factory=dict)

    def name_key(self, pod: PodRecord) -> str:
        return f"{self.name}_{pod.name}_{pod.namespace}_{pod.uid}_{self.attempt}"

    def to_dict(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContainerRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
