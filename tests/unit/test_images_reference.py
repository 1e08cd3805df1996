"""Reference normalization as kubelet and docker expect it."""

from __future__ import annotations

import pytest

from shimd import errors
from shimd.images import reference

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(("ref", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ("user/app", "docker.io/user/app:latest"),
    ("quay.io/org/app:v1", "quay.io/org/app:v1"),
    ("localhost/app", "localhost/app:latest"),
    ("127.0.0.1:5000/a/b/c:t", "127.0.0.1:5000/a/b/c:t"),
    (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
    (f"host:5000/app:v1@{D}", f"host:5000/app:v1@{D}"),
])
def test_normalize(ref: str, expected: str) -> None:
    assert str(reference.parse(ref)) == expected


def test_parts() -> None:
    r = reference.parse(f"127.0.0.1:5000/ns/app:v2@{D}")
    assert (r.domain, r.path, r.tag, r.digest) == ("127.0.0.1:5000", "ns/app", "v2", D)
    assert r.name == "127.0.0.1:5000/ns/app"
    assert r.object == D
    assert reference.parse("busybox").object == "latest"


@pytest.mark.parametrize("ref", [
    "", "UPPER", "Docker.io/Busybox", "busybox:", "busybox:bad/tag", ":tag", "a//b", "busybox@sha256:abc",
    "busybox@md5:" + "a" * 32, "-lead/app", "app/", "a" * 300, "host:port/app", "busybox:" + "t" * 200,
    "bad host/app",
])
def test_malformed(ref: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"image\.image"):
        reference.parse(ref)


def test_is_id() -> None:
    assert reference.is_id(D)
    assert reference.is_id("a" * 64)
    assert not reference.is_id("busybox")
    assert not reference.is_id("sha256:abc")
