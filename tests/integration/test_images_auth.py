"""Registry authentication (basic and token, from the request and the credentials file) and mirrors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest

from tests.integration.test_images_errors import assert_store_consistent
from tests.integration.test_images_pull import listed, pull
from tests.support import images as img
from tests.support.daemon import ShimdProcess
from tests.support.registry import PASSWORD, USER, Registry, free_port, insecure_toml, start_registry


def started(tmp_path: Path, extra: str, name: str = "sd") -> ShimdProcess:
    base = tmp_path / name
    base.mkdir()
    proc = ShimdProcess(base, extra)
    proc.start()
    return proc


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_auth_from_request(tmp_path: Path, kind: str, auth_registry: Registry, token_registry: Registry,
                           shimd_factory: object) -> None:
    reg = auth_registry if kind == "basic" else token_registry
    ref = reg.client().push_image("private", "v1", img.busybox_image())
    proc = started(tmp_path, insecure_toml(reg))
    try:
        for auth in ({}, {"username": USER, "password": "wrong"}):
            with pytest.raises(grpc.RpcError) as e:
                pull(proc, ref, **auth)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
            assert "authentication" in e.value.details() or "permission denied" in e.value.details()
            assert_store_consistent(proc)
        image_id = pull(proc, ref, username=USER, password=PASSWORD)
        assert [i.id for i in listed(proc)] == [image_id]
        other = reg.client().push_image("private2", "v1", img.busybox_image("docker"))
        docker_auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert pull(proc, other, auth=docker_auth)
    finally:
        proc.stop()


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_auth_from_credentials_file(tmp_path: Path, kind: str, auth_registry: Registry,
                                    token_registry: Registry) -> None:
    reg = auth_registry if kind == "basic" else token_registry
    ref = reg.client().push_image("fromfile", "v1", img.busybox_image())
    creds = tmp_path / "config.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    creds.write_text(json.dumps({"auths": {f"http://{reg.host}": {"auth": token}}}))
    extra = f'[registries]\ncredentials_file = "{creds}"\n' + insecure_toml(reg)
    proc = started(tmp_path, extra)
    try:
        assert pull(proc, ref)
    finally:
        proc.stop()


def test_dead_mirror_then_origin(tmp_path: Path, registry: Registry, test_images: object) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    extra = f'[registries.hosts."{registry.host}"]\nmirrors = ["{dead}"]\ninsecure = true\n'
    proc = started(tmp_path, extra)
    try:
        assert pull(proc, test_images.busybox)  # type: ignore[attr-defined]
    finally:
        proc.stop()


def test_mirror_serves_when_origin_is_down(tmp_path: Path) -> None:
    mirror = start_registry(tmp_path / "mirror")
    try:
        origin = f"127.0.0.1:{free_port()}"          # nothing listens: only the mirror can answer
        man = img.busybox_image()
        mirror.client().push_image("app", "v1", man)
        extra = f'[registries.hosts."{origin}"]\nmirrors = ["{mirror.url}"]\ninsecure = true\n'
        proc = started(tmp_path, extra)
        try:
            assert pull(proc, f"{origin}/app:v1") == man.config_digest
            assert [list(i.repo_tags) for i in listed(proc)] == [[f"{origin}/app:v1"]]
            assert mirror.blob_gets(man.layers[0].digest) == 1
        finally:
            proc.stop()
    finally:
        mirror.stop()
