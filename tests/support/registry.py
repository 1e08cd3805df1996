"""Real OCI registries for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1, plain
HTTP, private storage; optionally behind htpasswd basic auth or token auth with a small token
server signing real JWTs (RS256, x5c chain checked by the registry against our own CA cert).

Plain functions (start_registry, push_busybox) for any test, plus session fixtures (a pytest
plugin listed in tests/conftest.py).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support import images as img

REGISTRY_BIN = "/usr/bin/docker-registry"
USER, PASSWORD = "tester", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TokenServer:
    """Issues registry bearer tokens for USER/PASSWORD; anonymous requests get a token with no access."""

    cert_pem: bytes
    port: int
    _server: ThreadingHTTPServer
    _thread: threading.Thread
    issued: list[str] = field(default_factory=list)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def start_token_server(service: str, issuer: str) -> TokenServer:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shimd-test-token")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    issued: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            q = parse_qs(urlsplit(self.path).query)
            authed = self.headers.get("Authorization", "") == expected
            if self.headers.get("Authorization") and not authed:
                self.send_response(401)
                self.end_headers()
                return
            access = []
            for scope in q.get("scope", []):
                kind, _, rest = scope.partition(":")
                repo, _, actions = rest.rpartition(":")
                if authed:
                    access.append({"type": kind, "name": repo, "actions": actions.split(",")})
            t = int(time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der).decode()]}
            claims = {"iss": issuer, "sub": USER if authed else "", "aud": service, "exp": t + 300,
                      "nbf": t - 10, "iat": t, "jti": uuid.uuid4().hex, "access": access}
            signing = _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
            sig = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
            token = signing + "." + _b64url(sig)
            issued.append(token)
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return TokenServer(cert.public_bytes(serialization.Encoding.PEM), server.server_address[1], server, thread,
                       issued)


@dataclass
class Registry:
    host: str                       # "127.0.0.1:PORT"
    storage: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None
    auth: str = ""                  # "", "basic" or "token"
    username: str = ""
    password: str = ""
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def client(self) -> img.PushClient:
        return img.PushClient(self.host, self.username, self.password)

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def blob_gets(self, digest: str) -> int:
        """How many GETs of this blob the registry has answered (from its access log)."""
        text = self.log_path.read_text(errors="replace")
        pat = re.compile(r'"GET /v2/[^ ]+/blobs/' + re.escape(digest) + r' HTTP')
        return len(pat.findall(text))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.token_server:
            self.token_server.stop()
            self.token_server = None


def start_registry(base: Path, auth: str = "", timeout: float = 15.0) -> Registry:
    """Start docker-registry with storage under `base`; auth is "", "basic" (htpasswd) or "token"."""
    base.mkdir(parents=True, exist_ok=True)
    storage = base / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {host}",
    ]
    token_server = None
    if auth == "basic":
        import bcrypt

        htpasswd = base / "htpasswd"
        htpasswd.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)) + b"\n")
        lines += ["auth:", "  htpasswd:", "    realm: shimd-test", f"    path: {htpasswd}"]
    elif auth == "token":
        token_server = start_token_server("shimd-test-registry", "shimd-test-issuer")
        bundle = base / "token-ca.pem"
        bundle.write_bytes(token_server.cert_pem)
        lines += ["auth:", "  token:", f"    realm: {token_server.realm}", "    service: shimd-test-registry",
                  "    issuer: shimd-test-issuer", f"    rootcertbundle: {bundle}"]
    elif auth:
        raise ValueError(auth)
    config = base / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log_path = base / "registry.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log,
                                start_new_session=True)
    reg = Registry(host, storage, log_path, proc, auth, USER if auth else "", PASSWORD if auth else "", token_server)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            reg.stop()
            raise RuntimeError(f"docker-registry exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection(host, timeout=2)
            try:
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                return reg
            finally:
                conn.close()
        if time.monotonic() > deadline:
            reg.stop()
            raise TimeoutError(f"docker-registry did not answer on {host}")
        time.sleep(0.05)


def push_busybox(registry: Registry, name: str = "busybox", tag: str = "latest", fmt: str = "oci") -> str:
    """Push the single-layer busybox image; returns its reference "127.0.0.1:PORT/name:tag"."""
    return registry.client().push_image(name, tag, img.busybox_image(fmt))


def insecure_toml(*registries: Registry | str) -> str:
    """shimd config snippet that allows plain HTTP to these registries (Registry or "host:port")."""
    out = []
    for r in registries:
        host = r.host if isinstance(r, Registry) else r
        out.append(f'[registries.hosts."{host}"]\ninsecure = true\n')
    return "".join(out)


@dataclass
class PushedImages:
    """References of the images pushed once per session to the plain registry."""

    registry: Registry
    busybox: str                 # OCI manifest, gzip
    busybox_docker: str          # Docker schema2 manifest
    layered: str                 # gzip + zstd + uncompressed layers, whiteout and opaque dir
    multiarch: str               # OCI index amd64 + arm64
    manifests: dict[str, img.Manifest]
    index: img.Index


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def registry_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="shimd-reg-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own, which it may corrupt."""
    reg = start_registry(tmp_path / "reg")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry(registry_base: Path) -> Iterator[Registry]:
    reg = start_registry(registry_base / "plain")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(registry_base: Path) -> Iterator[Registry]:
    """htpasswd (bcrypt) basic auth."""
    reg = start_registry(registry_base / "basic", auth="basic")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(registry_base: Path) -> Iterator[Registry]:
    """Bearer token auth with a real signed JWT from a token server in this process."""
    reg = start_registry(registry_base / "token", auth="token")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def test_images(registry: Registry) -> PushedImages:
    c = registry.client()
    bb, bbd, lay, idx = img.busybox_image(), img.busybox_image("docker"), img.layered_image(), img.multiarch_index()
    return PushedImages(
        registry=registry,
        busybox=c.push_image("busybox", "latest", bb),
        busybox_docker=c.push_image("busybox-docker", "v1", bbd),
        layered=c.push_image("layered", "v1", lay),
        multiarch=c.push_image("multiarch", "latest", idx),
        manifests={"busybox": bb, "busybox_docker": bbd, "layered": lay},
        index=idx,
    )


@pytest.fixture(scope="session")
def registry_toml(registry: Registry) -> str:
    return insecure_toml(registry)


@pytest.fixture(scope="session")
def big_image_ref(registry: Registry) -> tuple[str, img.Manifest]:
    """~60 MB of incompressible layers in the plain registry (long enough to interrupt a pull)."""
    man = img.big_image(60, 4)
    return registry.client().push_image("big", "v1", man), man
