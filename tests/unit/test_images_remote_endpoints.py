"""How a registry is reached (a registry on the node itself is plain HTTP by default) and what of its
answers goes back to the client."""

from __future__ import annotations

import tomllib

import aiohttp
import pytest

from shimd import config
from shimd.images import reference
from shimd.images.remote import Remote, loopback_registry, registry_error_text


@pytest.mark.parametrize(("domain", "expected"), [
    ("localhost", True), ("localhost:5000", True), ("LocalHost:5000", True),
    ("127.0.0.1", True), ("127.0.0.1:5000", True), ("127.8.9.10:443", True),
    ("[::1]:5000", True), ("[::1]", True),
    ("10.0.0.1:5000", False), ("[::2]:5000", False), ("128.0.0.1", False),
    ("localhost.example.com:5000", False), ("registry.local", False), ("docker.io", False),
    ("127.0.0.1.nip.io:5000", False), ("", False),
])
def test_loopback_registry(domain: str, expected: bool) -> None:
    assert loopback_registry(domain) is expected


def origin(registries: str, ref: str) -> str:
    cfg = config.parse(tomllib.loads(registries)).registries
    remote = Remote(cfg, None, aiohttp.ClientTimeout(total=1))  # type: ignore[arg-type]  # no request made
    return remote.endpoints(reference.parse(ref))[-1].base


def test_a_registry_on_the_node_is_plain_http_unless_its_own_entry_says_otherwise() -> None:
    assert origin("", "127.0.0.1:5000/app:v1") == "http://127.0.0.1:5000"
    assert origin("", "localhost:5000/app:v1") == "http://localhost:5000"
    assert origin("", "[::1]:5000/app:v1") == "http://[::1]:5000"
    assert origin("", "registry.example.com:5000/app:v1") == "https://registry.example.com:5000"
    assert origin("", "busybox") == "https://registry-1.docker.io"
    entry = '[registries.hosts."127.0.0.1:5000"]\ninsecure = false\n'
    assert origin(entry, "127.0.0.1:5000/app:v1") == "https://127.0.0.1:5000"
    entry = '[registries.hosts."registry.example.com"]\ninsecure = true\n'
    assert origin(entry, "registry.example.com/app:v1") == "http://registry.example.com"


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {}}]}',
     ": MANIFEST_UNKNOWN: manifest unknown"),
    (b'{"errors": [{"code": "DENIED"}, {"message": "quota"}, 5]}', ": DENIED; quota"),
    (b'{"errors": []}', ""), (b'{"errors": "x"}', ""), (b'{"a": 1}', ""), (b"[1]", ""),
    (b"<html>internal page</html>", ""), (b'{"errors": [{"code": "X", "message": "', ""), (b"\xff\xfe", ""),
    (b'{"errors": [{"code": "C", "message": "' + b"m" * 300 + b'"}]}', ": C: " + "m" * 197),
])
def test_only_a_registry_error_document_is_echoed(body: bytes, expected: str) -> None:
    assert registry_error_text(body) == expected
