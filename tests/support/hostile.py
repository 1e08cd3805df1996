"""Hostile registry content for tests: a registry that serves whatever JSON and bytes a test gives it
(digests a real registry would refuse), and tar layers whose headers declare huge sizes.

Nothing here imports shimd.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import images as img

BLOCK = 512


@dataclass
class RawRegistry:
    """Serves manifests and blobs verbatim from dicts (keys are what the client asks for), on
    127.0.0.1 over plain HTTP, and remembers every path it was asked for."""

    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)   # ref -> (media type, body)
    blobs: dict[str, bytes] = field(default_factory=dict)                   # digest -> bytes
    requests: list[str] = field(default_factory=list)
    trickle_manifests: bool = False    # send manifests in small flushed pieces, as a slow link would
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> RawRegistry:
        reg = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "application/json",
                      trickle: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "GET":
                    return
                step = 4096 if trickle else len(body) or 1
                for i in range(0, len(body), step):
                    self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                    if trickle:
                        time.sleep(0.002)   # lets each piece reach the client on its own

            def do_GET(self) -> None:
                reg.requests.append(self.path)
                if self.path in ("/v2/", "/v2"):
                    self._send(200, b"{}")
                    return
                m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/(.+)", self.path)
                if m and m.group(2) == "manifests" and m.group(3) in reg.manifests:
                    mt, body = reg.manifests[m.group(3)]
                    self._send(200, body, mt, reg.trickle_manifests)
                elif m and m.group(2) == "blobs" and m.group(3) in reg.blobs:
                    self._send(200, reg.blobs[m.group(3)], "application/octet-stream")
                else:
                    self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}')

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def blob_requests(self) -> list[str]:
        return [p for p in self.requests if "/blobs/" in p]

    def add_image(self, repo_tag: str, man: img.Manifest, config_digest: str | None = None,
                  layer_digests: list[str] | None = None) -> None:
        """Serve `man` under tag `repo_tag`, optionally rewriting the digests its manifest names."""
        doc = json.loads(man.body)
        if config_digest is not None:
            doc["config"]["digest"] = config_digest
        for i, d in enumerate(layer_digests or []):
            doc["layers"][i]["digest"] = d
        self.manifests[repo_tag] = (man.media_type, json.dumps(doc).encode())
        self.blobs[man.config_digest] = man.config
        for layer in man.layers:
            self.blobs[layer.digest] = layer.blob


def _header(name: str, size: int, typeflag: bytes) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.mtime, ti.mode = size, typeflag, 1_700_000_000, 0o644
    return ti.tobuf(format=tarfile.GNU_FORMAT)


class _GzipLayer:
    """Writes a tar stream straight into gzip, hashing it, so a huge declared header never exists in
    the test's memory."""

    def __init__(self) -> None:
        self.z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self.out: list[bytes] = []
        self.raw = hashlib.sha256()
        self.n = 0

    def write(self, data: bytes) -> None:
        self.raw.update(data)
        self.n += len(data)
        self.out.append(self.z.compress(data))

    def repeat(self, byte: bytes, count: int) -> None:
        chunk = byte * (1 << 20)
        while count > 0:
            part = chunk[:min(count, len(chunk))]
            self.write(part)
            count -= len(part)

    def pad(self) -> None:
        if self.n % BLOCK:
            self.write(b"\0" * (BLOCK - self.n % BLOCK))

    def layer(self) -> img.Layer:
        self.write(b"\0" * (2 * BLOCK))
        self.out.append(self.z.flush())
        return img.Layer(b"".join(self.out), "sha256:" + self.raw.hexdigest(), img.LAYER_TYPES[("oci", "gzip")])


def pax_bomb_layer(size: int) -> img.Layer:
    """One PAX extended header holding a single `size`-byte record, then an empty file."""
    w = _GzipLayer()
    value_len = size - 32
    payload = len(" comment=\n") + value_len
    digits = len(str(payload))
    while len(str(payload + digits)) != digits:
        digits += 1
    record_len = payload + digits   # a record's length counts its own digits
    w.write(_header("././@PaxHeader", record_len, tarfile.XHDTYPE))
    w.write(f"{record_len} comment=".encode())
    w.repeat(b"a", value_len)
    w.write(b"\n")
    w.pad()
    w.write(_header("file", 0, tarfile.REGTYPE))
    return w.layer()


def gnu_longname_layer(size: int) -> img.Layer:
    """A GNU long-name header whose name is `size` bytes of one component, then the file it names."""
    w = _GzipLayer()
    w.write(_header("././@LongLink", size + 1, tarfile.GNUTYPE_LONGNAME))
    w.repeat(b"n", size)
    w.write(b"\0")
    w.pad()
    w.write(_header("short", 0, tarfile.REGTYPE))
    return w.layer()
