"""Builds OCI/Docker test images from Debian's busybox-static without docker, and pushes them to a
registry through the distribution v2 HTTP API.

Applets are hard links to /bin/busybox: Debian's static busybox only runs applets in-process from
its own shell, so symlinks or a bare binary would not give a usable image.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import subprocess
import tarfile
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import zstandard

BUSYBOX = "/bin/busybox"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass
class Entry:
    """One tar member. kind: dir, file, hardlink, symlink, chardev."""

    kind: str
    path: str
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.mode, ti.uid, ti.gid, ti.mtime = e.mode, e.uid, e.gid, 1_700_000_000
            if e.xattrs:
                ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            fileobj = None
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "file":
                ti.size = len(e.data)
                fileobj = io.BytesIO(e.data)
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "chardev":
                ti.type = tarfile.CHRTYPE
            else:
                raise ValueError(e.kind)
            tf.addfile(ti, fileobj)
    return buf.getvalue()


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if how == "none":
        return raw
    raise ValueError(how)


@dataclass
class Layer:
    blob: bytes          # as stored in the registry (compressed)
    diff_id: str         # digest of the uncompressed tar
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.blob)


def make_layer(entries: Iterable[Entry], how: str = "gzip", fmt: str = "oci") -> Layer:
    raw = tar_bytes(entries)
    return Layer(compress(raw, how), sha256(raw), LAYER_TYPES[(fmt, how)])


@cache
def _applets() -> tuple[str, ...]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout
    return tuple(sorted({a for a in out.split() if a and a != "busybox" and "/" not in a}))


@cache
def _busybox_bytes() -> bytes:
    with open(BUSYBOX, "rb") as f:
        return f.read()


def busybox_entries() -> list[Entry]:
    out = [
        Entry("dir", "bin", mode=0o755),
        Entry("file", "bin/busybox", _busybox_bytes(), mode=0o755),
    ]
    out += [Entry("hardlink", f"bin/{a}", target="bin/busybox") for a in _applets()]
    out += [
        Entry("dir", "etc", mode=0o755),
        Entry("file", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
              b"app:x:1000:1000:app:/home/app:/bin/sh\n"
              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        Entry("file", "etc/group", b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"),
        Entry("dir", "tmp", mode=0o1777),
        Entry("dir", "root", mode=0o700),
        Entry("dir", "home", mode=0o755),
        Entry("dir", "home/app", mode=0o755, uid=1000, gid=1000),
        Entry("dir", "proc", mode=0o755),
        Entry("dir", "sys", mode=0o755),
        Entry("dir", "dev", mode=0o755),
    ]
    return out


@cache
def busybox_layer(how: str = "gzip", fmt: str = "oci") -> Layer:
    return make_layer(busybox_entries(), how, fmt)


# ---------------------------------------------------------------------------------------------
# Images


@dataclass
class Manifest:
    media_type: str
    body: bytes
    config: bytes
    layers: list[Layer]
    platform: dict[str, str]

    @property
    def digest(self) -> str:
        return sha256(self.body)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def size(self) -> int:
        """What the runtime reports: compressed layers + config."""
        return len(self.config) + sum(len(layer.blob) for layer in self.layers)


@dataclass
class Index:
    media_type: str
    body: bytes
    manifests: list[Manifest]

    @property
    def digest(self) -> str:
        return sha256(self.body)


def make_image(layers: list[Layer], fmt: str = "oci", arch: str = "amd64", cmd: list[str] | None = None,
               extra_config: dict[str, object] | None = None) -> Manifest:
    config: dict[str, object] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": cmd or ["sh"], "Env": [PATH_ENV], "WorkingDir": "/", **(extra_config or {})},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "tests/support/images.py"} for _ in layers],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    mt, ct = (OCI_MANIFEST, OCI_CONFIG) if fmt == "oci" else (DOCKER_MANIFEST, DOCKER_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {"mediaType": ct, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": len(layer.blob)}
                   for layer in layers],
    }
    body = json.dumps(manifest, indent=2).encode()
    return Manifest(mt, body, config_bytes, layers, {"os": "linux", "architecture": arch})


def make_index(manifests: list[Manifest], fmt: str = "oci") -> Index:
    mt = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": [{"mediaType": m.media_type, "digest": m.digest, "size": len(m.body), "platform": m.platform}
                      for m in manifests],
    }
    return Index(mt, json.dumps(index, indent=2).encode(), manifests)


def busybox_image(fmt: str = "oci", how: str = "gzip") -> Manifest:
    # The label keeps the formats' image ids apart (same config would mean the same image).
    return make_image([busybox_layer(how, fmt)], fmt, extra_config={"Labels": {"shimd.test.format": fmt}})


def layered_image() -> Manifest:
    """busybox (gzip) + a zstd layer adding files + an uncompressed layer with a whiteout and an opaque dir.

    Expected merged view: /data/keep present, /data/gone absent, /opq holds only c.
    """
    add = make_layer([
        Entry("dir", "data", mode=0o755),
        Entry("file", "data/keep", b"keep\n"),
        Entry("file", "data/gone", b"gone\n"),
        Entry("dir", "opq", mode=0o755),
        Entry("file", "opq/a", b"a\n"),
        Entry("file", "opq/b", b"b\n"),
        Entry("file", "data/owned", b"owned\n", mode=0o640, uid=1000, gid=1000),
    ], "zstd")
    delete = make_layer([
        Entry("dir", "data", mode=0o755),
        Entry("file", "data/.wh.gone"),
        Entry("dir", "opq", mode=0o755),
        Entry("file", "opq/.wh..wh..opq"),
        Entry("file", "opq/c", b"c\n"),
    ], "none")
    return make_image([busybox_layer(), add, delete])


def multiarch_index() -> Index:
    amd = make_image([busybox_layer(), make_layer([Entry("file", "ARCH", b"amd64\n")])], arch="amd64")
    arm = make_image([make_layer([Entry("file", "ARCH", b"arm64\n")])], arch="arm64")
    return make_index([arm, amd])  # arm64 first, so picking the first entry would be wrong


@cache
def big_image(total_mb: int = 100, layers: int = 5) -> Manifest:
    """~total_mb of incompressible data split over several gzip layers, on top of busybox."""
    per = total_mb * 1024 * 1024 // layers
    out = [busybox_layer()]
    for i in range(layers):
        out.append(make_layer([Entry("dir", "blob", mode=0o755),
                               Entry("file", f"blob/part{i}", os.urandom(per))], "gzip"))
    return make_image(out)


# ---------------------------------------------------------------------------------------------
# Pushing (distribution v2 API, monolithic uploads)


class PushError(Exception):
    pass


@dataclass
class PushClient:
    """Minimal registry client for tests: basic and bearer-token auth, monolithic blob upload."""

    host: str
    username: str = ""
    password: str = ""
    _token: str = ""

    def _basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def _auth_header(self) -> dict[str, str]:
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        if self.username:
            return {"Authorization": self._basic()}
        return {}

    def _fetch_token(self, challenge: str) -> None:
        params = dict(p.split("=", 1) for p in _split_params(challenge[len("Bearer "):]))
        params = {k: v.strip('"') for k, v in params.items()}
        realm = urllib.parse.urlsplit(params.pop("realm"))
        query = urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection(realm.netloc, timeout=30)
        try:
            headers = {"Authorization": self._basic()} if self.username else {}
            conn.request("GET", f"{realm.path}?{query}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise PushError(f"token server said {resp.status}: {body[:200]!r}")
            self._token = json.loads(body)["token"]
        finally:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        for _ in range(2):
            conn = http.client.HTTPConnection(self.host, timeout=60)
            try:
                conn.request(method, path, body=body, headers={**(headers or {}), **self._auth_header()})
                resp = conn.getresponse()
                data = resp.read()
                hdrs = {k.lower(): v for k, v in resp.getheaders()}
            finally:
                conn.close()
            challenge = hdrs.get("www-authenticate", "")
            if resp.status == 401 and challenge.startswith("Bearer "):
                self._fetch_token(challenge)
                continue
            return resp.status, hdrs, data
        return resp.status, hdrs, data

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        status, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if status == 200:
            return digest
        status, hdrs, body = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"", {"Content-Length": "0"})
        if status != 202:
            raise PushError(f"start upload {repo}: {status} {body[:200]!r}")
        loc = urllib.parse.urlsplit(hdrs["location"])
        sep = "&" if loc.query else ""
        path = f"{loc.path}?{loc.query}{sep}digest={urllib.parse.quote(digest)}"
        status, _, body = self.request("PUT", path, data, {"Content-Type": "application/octet-stream",
                                                            "Content-Length": str(len(data))})
        if status != 201:
            raise PushError(f"upload {digest} to {repo}: {status} {body[:200]!r}")
        return digest

    def push_manifest(self, repo: str, reference: str, media_type: str, body: bytes) -> None:
        status, _, resp = self.request("PUT", f"/v2/{repo}/manifests/{reference}", body,
                                       {"Content-Type": media_type})
        if status != 201:
            raise PushError(f"put manifest {repo}:{reference}: {status} {resp[:300]!r}")

    def push_image(self, repo: str, tag: str, image: Manifest | Index) -> str:
        """Push every blob and manifest; returns "host/repo:tag"."""
        manifests = image.manifests if isinstance(image, Index) else [image]
        for m in manifests:
            for layer in m.layers:
                self.push_blob(repo, layer.blob)
            self.push_blob(repo, m.config)
            ref = m.digest if isinstance(image, Index) else tag
            self.push_manifest(repo, ref, m.media_type, m.body)
        if isinstance(image, Index):
            self.push_manifest(repo, tag, image.media_type, image.body)
        return f"{self.host}/{repo}:{tag}"


def _split_params(s: str) -> list[str]:
    """Split a WWW-Authenticate parameter list on commas outside quotes."""
    out, cur, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out
