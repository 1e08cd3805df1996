"""What a pod gives the specs of its containers: a pure function of the pod record and where its files are.

Its own module so the container side needs nothing of the pod service (issue 17: no import cycles).
"""

from __future__ import annotations

import os
from pathlib import Path

from shimd.api.runtime import v1 as cri
from shimd.network import namespaces
from shimd.oci import spec as ocispec
from shimd.store.records import PodRecord, config_field


def pod_dir(state_dir: Path, pod_id: str) -> Path:
    """The pod's own files (hosts, resolv.conf, shm, the pause bundle) under the daemon's state directory."""
    return state_dir / "pods" / pod_id


def pod_context(pod: PodRecord, state_dir: Path) -> ocispec.PodContext:
    pdir = pod_dir(state_dir, pod.id)
    hostname = config_field(pod.config, "hostname") or (os.uname().nodename if pod.host_network else pod.name)
    files = {"/etc/hosts": str(pdir / "hosts"), "/etc/resolv.conf": str(pdir / "resolv.conf")}
    if not pod.host_network:
        files["/etc/hostname"] = str(pdir / "hostname")
    return ocispec.PodContext(
        pod_id=pod.id, name=pod.name, namespace=pod.namespace, uid=pod.uid, hostname=hostname,
        namespaces=dict(pod.namespaces),
        pid_ns_path=f"/proc/{pod.sandbox_pid}/ns/pid" if pod.sandbox_task and pod.sandbox_pid else "",
        files=files, shm_path=str(pdir / "shm") if "ipc" in pod.namespaces else "",
        sysctls=dict(config_field(pod.config, "linux", "sysctls", default={})),
        privileged_pod=pod.annotations.get("shimd.io/privileged") == "true",
        userns=pod_userns(pod),
    )


def pod_userns(pod: PodRecord) -> ocispec.IdMappings | None:
    """The pod's mappings, from its config as given (validated when the pod was made)."""
    if namespaces.USER not in pod.namespaces:
        return None
    raw = config_field(pod.config, "linux", "securityContext", "namespaceOptions", default={})
    return ocispec.user_namespace(cri.NamespaceOption().from_dict(raw), ocispec.POD_USERNS_FIELD)
