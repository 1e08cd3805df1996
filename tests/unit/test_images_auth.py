"""Credential sources and WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from shimd import errors
from shimd.images.auth import Auth, lookup, parse_challenge


def test_parse_challenge() -> None:
    scheme, params = parse_challenge('Bearer realm="http://h:1/token",service="reg",scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "http://h:1/token", "service": "reg", "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_user_pass_forms() -> None:
    assert Auth(username="u", password="p").user_pass() == ("u", "p")
    assert Auth(auth=base64.b64encode(b"u:p:x").decode()).user_pass() == ("u", "p:x")
    assert Auth().user_pass() is None and Auth().empty
    with pytest.raises(errors.InvalidArgument, match=r"auth\.auth"):
        Auth(auth="!!!").user_pass()


async def test_credentials_file_keys(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    tok = base64.b64encode(b"hub:pw").decode()
    f.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": tok},
        "http://127.0.0.1:5000": {"username": "u", "password": "p"},
        "quay.io": {"identitytoken": "refresh"},
    }}))
    hub = await lookup(str(f), "docker.io")
    assert hub is not None and hub.user_pass() == ("hub", "pw")
    local = await lookup(str(f), "127.0.0.1:5000")
    assert local is not None and local.user_pass() == ("u", "p")
    quay = await lookup(str(f), "quay.io")
    assert quay is not None and quay.identity_token == "refresh"
    assert await lookup(str(f), "other.io") is None
    assert await lookup(str(tmp_path / "missing.json"), "docker.io") is None
    assert await lookup("", "docker.io") is None
