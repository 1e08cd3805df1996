"""Image references as kubelet writes them, normalized the way docker and containerd do.

"busybox" -> docker.io/library/busybox:latest; "host:5000/a/b@sha256:..." keeps its digest.
Grammar from the distribution reference spec; only sha256 digests are accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shimd import errors

DOCKER_HUB = "docker.io"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
ID_HEX = re.compile(r"^[0-9a-f]{64}$")
FIELD = "image.image"


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def tagged(self) -> str:
        return f"{self.name}:{self.tag}" if self.tag else ""

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when known, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _bad(ref: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{FIELD}: invalid image reference {ref!r}: {why}")


def parse(ref: str) -> Reference:
    """Parse and normalize; raises InvalidArgument naming image.image."""
    if not ref:
        raise _bad(ref, "empty")
    if len(ref) > 255 + 128 + 72:
        raise _bad(ref[:64] + "...", "too long")
    rest, digest = ref, ""
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST.match(digest):
            raise _bad(ref, "digest must be sha256:<64 lowercase hex>")
    tag = ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, _, tag = rest.rpartition(":")
        if not _TAG.match(tag):
            raise _bad(ref, f"invalid tag {tag!r}")
    parts = rest.split("/")
    domain = DOCKER_HUB
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"
                           or parts[0].lower() != parts[0]):
        domain = parts.pop(0)
        if not _DOMAIN.match(domain):
            raise _bad(ref, f"invalid registry host {domain!r}")
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DOCKER_HUB
    if not parts or any(not _PATH_COMPONENT.match(p) for p in parts):
        raise _bad(ref, "repository name must be lowercase path components [a-z0-9._-]")
    if domain == DOCKER_HUB and len(parts) == 1:
        parts.insert(0, "library")
    path = "/".join(parts)
    if len(domain) + 1 + len(path) > 255:
        raise _bad(ref, "repository name longer than 255 characters")
    if not tag and not digest:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def is_id(ref: str) -> bool:
    """An image id, with or without its "sha256:" prefix."""
    return bool(ID_HEX.match(ref.removeprefix("sha256:"))) and (ref.startswith("sha256:") or len(ref) == 64)
