"""Checks on CRI requests that need no state: missing or malformed fields fail INVALID_ARGUMENT here."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import betterproto

from shimd.api.runtime import v1 as cri
from shimd.errors import InvalidArgument
from shimd.network import files as podfiles
from shimd.oci import spec as ocispec

_NAME = re.compile(r"^[^/\x00]{1,253}$")


def _name(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} must not be empty")
    if not _NAME.match(value):
        raise InvalidArgument(f"{field} {value!r} must be at most 253 characters without '/' or NUL")


@dataclass(frozen=True)
class ValidPod:
    """A RunPodSandbox config that passed validation, with what validating it parsed."""

    config: cri.PodSandboxConfig
    userns: ocispec.IdMappings | None  # the pod's own user namespace, if it asks for one


def pod_config(config: cri.PodSandboxConfig | None) -> ValidPod:
    if config is None or not betterproto.serialized_on_wire(config):
        raise InvalidArgument("config must be set")
    if not betterproto.serialized_on_wire(config.metadata):
        raise InvalidArgument("config.metadata must be set")
    md = config.metadata
    _name(md.name, "config.metadata.name")
    _name(md.namespace, "config.metadata.namespace")
    _name(md.uid, "config.metadata.uid")
    if config.hostname:
        # Only a hostname the client sent is checked: without one, shimd picks a valid one itself.
        podfiles.validate_hostname(config.hostname, "config.hostname")
    if config.log_directory and not os.path.isabs(config.log_directory):
        raise InvalidArgument(f"config.log_directory {config.log_directory!r} must be an absolute path")
    for i, p in enumerate(config.port_mappings):
        if not 0 < p.container_port < 65536:
            raise InvalidArgument(f"config.port_mappings[{i}].container_port {p.container_port} is out of range")
        if not 0 <= p.host_port < 65536:
            raise InvalidArgument(f"config.port_mappings[{i}].host_port {p.host_port} is out of range")
    pod_security(config)
    return ValidPod(config, pod_userns(config))


def container_config(config: cri.ContainerConfig | None) -> cri.ContainerConfig:
    if config is None or not betterproto.serialized_on_wire(config):
        raise InvalidArgument("config must be set")
    if not betterproto.serialized_on_wire(config.metadata):
        raise InvalidArgument("config.metadata must be set")
    _name(config.metadata.name, "config.metadata.name")
    if not config.image.image:
        raise InvalidArgument("config.image.image must not be empty")
    if config.log_path:
        if os.path.isabs(config.log_path):
            raise InvalidArgument(f"config.log_path {config.log_path!r} must be relative to the log directory")
        norm = os.path.normpath(config.log_path)
        if norm.startswith(".."):
            raise InvalidArgument(f"config.log_path {config.log_path!r} escapes the pod's log directory")
    for i, kv in enumerate(config.envs):
        if not kv.key or "=" in kv.key:
            raise InvalidArgument(f"config.envs[{i}].key {kv.key!r} must be non-empty without '='")
    recursive_read_only(config.mounts)
    if betterproto.serialized_on_wire(config.linux):
        sc = config.linux.security_context
        _group_needs_user(sc.run_as_group, sc.run_as_user, sc.run_as_username, "config.linux.security_context")
    return config


def recursive_read_only(mounts: list[cri.Mount]) -> None:
    """The CRI's rules for Mount.recursive_read_only: it only strengthens a read-only, private mount
    (a submount that propagates in later could not be made read-only)."""
    for i, m in enumerate(mounts):
        if not m.recursive_read_only:
            continue
        if not m.readonly:
            raise InvalidArgument(f"config.mounts[{i}].recursive_read_only needs config.mounts[{i}].readonly "
                                  "to be true")
        if m.propagation != cri.MountPropagation.PROPAGATION_PRIVATE:
            raise InvalidArgument(f"config.mounts[{i}].recursive_read_only needs config.mounts[{i}].propagation "
                                  f"PROPAGATION_PRIVATE, got {m.propagation.name}")


def _group_needs_user(group: cri.Int64Value, user: cri.Int64Value, username: str, field: str) -> None:
    """As kubelet, containerd and CRI-O: a group alone would pair it with whatever user the image names."""
    if betterproto.serialized_on_wire(group) and not betterproto.serialized_on_wire(user) and not username:
        raise InvalidArgument(f"{field}.run_as_group is set without run_as_user or run_as_username")


def required_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} must not be empty")
    return value


def archive_path(value: str, field: str) -> str:
    """An absolute file path (a checkpoint archive's); returned normalised."""
    if not value:
        raise InvalidArgument(f"{field} must not be empty")
    if not os.path.isabs(value) or value.endswith("/") or "\x00" in value:
        raise InvalidArgument(f"{field} {value!r} must be an absolute path of the archive file")
    return os.path.normpath(value)


def timeout(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field} must not be negative, got {value}")
    return value


def pod_security(config: cri.PodSandboxConfig) -> None:
    """Refuse host-wide sysctls, or ones for a namespace the pod shares with the host, and a group without a
    user, before making anything."""
    if not betterproto.serialized_on_wire(config.linux):
        return
    sc = config.linux.security_context
    _group_needs_user(sc.run_as_group, sc.run_as_user, "", "config.linux.security_context")
    ns = sc.namespace_options
    private = set()
    if ns.network != cri.NamespaceMode.NODE:
        private |= {"network", "uts"}
    if ns.ipc != cri.NamespaceMode.NODE:
        private.add("ipc")
    ocispec.validate_sysctls(dict(config.linux.sysctls), private, "config.linux.sysctls")


def pod_userns(config: cri.PodSandboxConfig) -> ocispec.IdMappings | None:
    """A pod user namespace owns the pod's network, IPC and PID namespaces, so none may be the host's."""
    if not betterproto.serialized_on_wire(config.linux):
        return None
    ns = config.linux.security_context.namespace_options
    userns = ocispec.user_namespace(ns, ocispec.POD_USERNS_FIELD)
    if userns is None:
        return None
    shared = [kind for kind in ("network", "ipc", "pid") if getattr(ns, kind) == cri.NamespaceMode.NODE]
    if shared:
        raise InvalidArgument(f"{ocispec.POD_USERNS_FIELD}: a pod with its own user namespace cannot use the "
                              f"host's {', '.join(shared)} namespace (config.linux.security_context."
                              "namespace_options)")
    return userns
