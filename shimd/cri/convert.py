"""Store records -> CRI messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import betterproto

from shimd.api.runtime import v1 as cri
from shimd.store.records import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    POD_READY,
    ContainerRecord,
    PodRecord,
    config_field,
)

_CSTATE = {
    CONTAINER_CREATED: cri.ContainerState.CONTAINER_CREATED,
    CONTAINER_RUNNING: cri.ContainerState.CONTAINER_RUNNING,
    CONTAINER_EXITED: cri.ContainerState.CONTAINER_EXITED,
}


def pod_state(pod: PodRecord) -> cri.PodSandboxState:
    return cri.PodSandboxState.SANDBOX_READY if pod.state == POD_READY else cri.PodSandboxState.SANDBOX_NOTREADY


def container_state(ctr: ContainerRecord) -> cri.ContainerState:
    return _CSTATE.get(ctr.state, cri.ContainerState.CONTAINER_UNKNOWN)


def pod_metadata(pod: PodRecord) -> cri.PodSandboxMetadata:
    return cri.PodSandboxMetadata(name=pod.name, uid=pod.uid, namespace=pod.namespace, attempt=pod.attempt)


def pod_summary(pod: PodRecord) -> cri.PodSandbox:
    return cri.PodSandbox(id=pod.id, metadata=pod_metadata(pod), state=pod_state(pod), created_at=pod.created_at,
                          labels=dict(pod.labels), annotations=dict(pod.annotations), runtime_handler=pod.handler)


def pod_status(pod: PodRecord) -> cri.PodSandboxStatus:
    raw_ns = config_field(pod.config, "linux", "securityContext", "namespaceOptions")
    ns_opts = cri.NamespaceOption().from_dict(raw_ns) if raw_ns else cri.NamespaceOption()
    network = cri.PodSandboxNetworkStatus(ip=pod.ip, additional_ips=[cri.PodIp(ip=ip) for ip in pod.additional_ips])
    return cri.PodSandboxStatus(
        id=pod.id, metadata=pod_metadata(pod), state=pod_state(pod), created_at=pod.created_at, network=network,
        linux=cri.LinuxPodSandboxStatus(namespaces=cri.Namespace(options=ns_opts)), labels=dict(pod.labels),
        annotations=dict(pod.annotations), runtime_handler=pod.handler,
    )


def pod_info(pod: PodRecord) -> dict[str, str]:
    return {"info": json.dumps({
        "pid": pod.sandbox_pid, "handler": pod.handler, "shimAddress": pod.shim_address, "shimDead": pod.shim_dead,
        "namespaces": pod.namespaces, "cgroupParent": pod.cgroup_parent, "hostNetwork": pod.host_network,
        "resources": pod.resources, "config": pod.config,
    })}


def image_as_given(ctr: ContainerRecord) -> tuple[dict[str, str], str]:
    """The image annotations and user_specified_image of the container's config, as kubelet sent them.

    user_specified_image is kubelet's record of what the user wrote: echoed when sent, not made up.
    """
    return (config_field(ctr.config, "image", "annotations", default={}),
            config_field(ctr.config, "image", "userSpecifiedImage", default=""))


def _image_spec(ctr: ContainerRecord) -> cri.ImageSpec:
    annotations, user_specified = image_as_given(ctr)
    return cri.ImageSpec(image=ctr.image_ref, annotations=dict(annotations), user_specified_image=user_specified)


def container_summary(ctr: ContainerRecord) -> cri.Container:
    return cri.Container(
        id=ctr.id, pod_sandbox_id=ctr.pod_id, metadata=cri.ContainerMetadata(name=ctr.name, attempt=ctr.attempt),
        image=_image_spec(ctr), image_ref=ctr.image_id, state=container_state(ctr), created_at=ctr.created_at,
        labels=dict(ctr.labels), annotations=dict(ctr.annotations), image_id=ctr.image_id,
    )


def _mount(m: dict[str, Any]) -> cri.Mount:
    out = cri.Mount(container_path=m["container_path"], host_path=m["host_path"], readonly=m["readonly"],
                    selinux_relabel=m["selinux_relabel"], propagation=cri.MountPropagation(m["propagation"]),
                    recursive_read_only=m.get("recursive_read_only", False))
    if m.get("image_id"):
        # As containerd reports an image volume: the image as given and the id it resolved to.
        out.image = cri.ImageSpec(image=m.get("image", ""), user_specified_image=m.get("user_specified_image", ""),
                                  image_ref=m["image_id"])
        out.image_sub_path = m.get("image_sub_path", "")
    return out


def container_status(ctr: ContainerRecord, image_ref: str) -> cri.ContainerStatus:
    mounts = [_mount(m) for m in ctr.mounts]
    return cri.ContainerStatus(
        id=ctr.id, metadata=cri.ContainerMetadata(name=ctr.name, attempt=ctr.attempt), state=container_state(ctr),
        created_at=ctr.created_at, started_at=ctr.started_at, finished_at=ctr.finished_at, exit_code=ctr.exit_code,
        image=_image_spec(ctr), image_ref=image_ref or ctr.image_id, reason=ctr.reason, message=ctr.message,
        labels=dict(ctr.labels), annotations=dict(ctr.annotations), mounts=mounts, log_path=ctr.log_path,
        image_id=ctr.image_id, user=_user(ctr.user),
    )


def _user(user: dict[str, Any]) -> cri.ContainerUser | None:
    if not user:
        return None
    return cri.ContainerUser(linux=cri.LinuxContainerUser(uid=user["uid"], gid=user["gid"],
                                                          supplemental_groups=list(user["groups"])))


def container_info(ctr: ContainerRecord) -> dict[str, str]:
    return {"info": json.dumps({
        "sandboxID": ctr.pod_id, "pid": ctr.pid, "bundle": ctr.bundle, "writableLayer": ctr.fs_dir,
        "config": ctr.config,
    })}


def labels_match(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Filter:
    """A CRI list or stats filter read into plain values once per call: betterproto's attribute access
    costs about a microsecond, and a filter is consulted for every pod or container on the node."""

    id: str = ""
    pod_sandbox_id: str = ""
    state: int | None = None  # None: any state
    labels: dict[str, str] = field(default_factory=dict)

    def admits(self, ident: str, labels: dict[str, str], pod_id: str = "", state: int | None = None,
               prefix: bool = True) -> bool:
        """List filters match ids by prefix (as crictl's short ids); stats filters match them exactly."""
        same = str.startswith if prefix else str.__eq__
        if self.id and not same(ident, self.id):
            return False
        if self.pod_sandbox_id and not same(pod_id, self.pod_sandbox_id):
            return False
        if self.state is not None and state != self.state:
            return False
        return not self.labels or labels_match(labels, self.labels)


def read_filter(f: betterproto.Message) -> Filter:
    state = getattr(f, "state", None)  # stats filters have no state, pod filters no pod id
    return Filter(id=f.id, pod_sandbox_id=getattr(f, "pod_sandbox_id", ""),  # type: ignore[attr-defined]
                  state=int(state.state) if state is not None and betterproto.serialized_on_wire(state) else None,
                  labels=dict(f.label_selector))  # type: ignore[attr-defined]
