"""What a pod gives the specs of its containers: a pure function of the pod record and where its files are.

Its own module so the container side needs nothing of the pod service (issue 17: no import cycles).
"""

from __future__ import annotations

import os
from pathlib import Path

from shimd import errors
from shimd.api.runtime import v1 as cri
from shimd.network import files as podfiles
from shimd.network import namespaces
from shimd.oci import spec as ocispec
from shimd.store.records import PodRecord, config_field

# How much of the pod id names a pod whose name is no valid hostname (as CRI-O).
HOSTNAME_ID_PREFIX = 12


def pod_dir(state_dir: Path, pod_id: str) -> Path:
    """The pod's own files (hosts, resolv.conf, shm, the pause bundle) under the daemon's state directory."""
    return state_dir / "pods" / pod_id


def pod_hostname(pod: PodRecord) -> str:
    """The hostname the client sent (validated then), else one that is always valid: the node's for a pod on
    the host's network, the pod name when it is a valid hostname, else a prefix of the pod id (as CRI-O)."""
    sent = config_field(pod.config, "hostname")
    if sent:
        return str(sent)
    if pod.host_network:
        return os.uname().nodename
    if podfiles.is_hostname_label(pod.name):
        return pod.name
    return pod.id[:HOSTNAME_ID_PREFIX]


def pod_context(pod: PodRecord, state_dir: Path) -> ocispec.PodContext:
    pdir = pod_dir(state_dir, pod.id)
    hostname = pod_hostname(pod)
    files = {"/etc/hosts": str(pdir / "hosts"), "/etc/resolv.conf": str(pdir / "resolv.conf")}
    if not pod.host_network:
        files["/etc/hostname"] = str(pdir / "hostname")
    return ocispec.PodContext(
        pod_id=pod.id, name=pod.name, namespace=pod.namespace, uid=pod.uid, hostname=hostname,
        namespaces=dict(pod.namespaces),
        pid_ns_path=f"/proc/{pod.sandbox_pid}/ns/pid" if pod.sandbox_task and pod.sandbox_pid else "",
        files=files, shm_path=str(pdir / "shm") if "ipc" in pod.namespaces else "",
        sysctls=dict(config_field(pod.config, "linux", "sysctls", default={})),
        # From the sandbox config kubelet sent, never from annotations: the pod's author writes those.
        privileged_pod=config_field(pod.config, "linux", "securityContext", "privileged", default=False) is True,
        userns=pod_userns(pod),
    )


def pod_userns(pod: PodRecord) -> ocispec.IdMappings | None:
    """The pod's mappings, from its config as given (validated when the pod was made)."""
    if namespaces.USER not in pod.namespaces:
        return None
    raw = config_field(pod.config, "linux", "securityContext", "namespaceOptions", default={})
    return ocispec.user_namespace(cri.NamespaceOption().from_dict(raw), ocispec.POD_USERNS_FIELD)


def mapped_root_gid(pod: PodRecord) -> int | None:
    """The host gid of the pod's root when it has its own user namespace."""
    try:
        userns = pod_userns(pod)
    except errors.ShimdError:
        return None
    root = userns.host_root() if userns is not None else None
    return root[1] if root is not None else None
