"""OCI distribution v2 client: manifests and blobs from a registry's mirrors, then its origin.

Blobs stream to a file while their digest and size are checked; nothing larger than a chunk is
held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from shimd import config, errors, log
from shimd.images import digest as digests
from shimd.images.auth import Auth, Authorizer, lookup, read_bounded
from shimd.images.follow import Progress
from shimd.images.reference import DOCKER_HUB, FIELD, Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
MAX_MANIFEST = 4 << 20
WRITE_CHUNK = 1 << 20

T = TypeVar("T")


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def of(cls, d: Any, what: str) -> Descriptor:
        try:
            desc = cls(str(d.get("mediaType", "")), str(d["digest"]), int(d["size"]), dict(d.get("platform") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise errors.FailedPrecondition(f"{FIELD}: {what}: malformed descriptor") from e
        # The digest names a file in the store: nothing else may look at it before it is checked.
        digests.check(desc.digest, f"{FIELD}: {what}")
        if desc.size < 0:
            raise errors.FailedPrecondition(f"{FIELD}: {what}: negative size {desc.size}")
        return desc


@dataclass(frozen=True)
class Endpoint:
    base: str          # "http://127.0.0.1:5000", no trailing slash
    host: str          # credentials lookup key
    mirror: bool


def loopback_registry(domain: str) -> bool:
    """Whether a registry's host[:port] is this node itself: localhost, 127.0.0.0/8 or ::1."""
    host = domain
    if host.startswith("["):  # [v6]:port
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def registry_error_text(body: bytes) -> str:
    """": CODE: message; ..." from a registry's error document (the distribution spec's {"errors": [...]}),
    else "": whatever else answered (a local HTTP service named as a registry, say) is not echoed back."""
    try:
        doc = json.loads(body)
    except ValueError:  # not JSON, or cut off by the read limit
        return ""
    found = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(found, list):
        return ""
    parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in found if isinstance(e, dict)]
    text = "; ".join(p for p in parts if p)
    return f": {text[:200]}" if text else ""


class _TryNext(Exception):
    """This endpoint cannot serve the request; the next one may."""

    def __init__(self, error: errors.ShimdError, unreachable: bool = False) -> None:
        super().__init__(str(error))
        self.error, self.unreachable = error, unreachable


class CorruptBlob(errors.Unavailable):
    """The registry served bytes that do not match the digest or size; nothing was stored."""


class Remote:
    def __init__(self, cfg: config.RegistriesConfig, session: aiohttp.ClientSession,
                 timeout: aiohttp.ClientTimeout) -> None:
        self.cfg = cfg
        self.session = session
        self.timeout = timeout
        self.authorizer = Authorizer(session, timeout)
        self.log = log.get("images.remote")

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        hc = self.cfg.hosts.get(ref.domain)
        out = [Endpoint(m.rstrip("/").removesuffix("/v2"), m.split("://", 1)[1].split("/", 1)[0], True)
               for m in (hc.mirrors if hc else [])]
        origin = "registry-1.docker.io" if ref.domain == DOCKER_HUB else ref.domain
        # A registry on the node itself is reached over plain HTTP unless its own entry says otherwise,
        # as containerd's CRI and Docker do: its traffic never leaves the host.
        insecure = hc.insecure if hc else loopback_registry(ref.domain)
        scheme = "http" if insecure else "https"
        out.append(Endpoint(f"{scheme}://{origin}", ref.domain, False))
        return out

    async def _auth_for(self, ep: Endpoint, ref: Reference, auth: Auth | None) -> Auth | None:
        if auth and not auth.empty and not ep.mirror:
            return auth
        return await lookup(self.cfg.credentials_file, ep.host)

    async def _open(self, ep: Endpoint, ref: Reference, path: str, headers: dict[str, str],
                    auth: Auth | None) -> aiohttp.ClientResponse:
        """GET with the auth dance; the caller releases the response. Raises _TryNext or a final error."""
        url = f"{ep.base}/v2/{ref.path}/{path}"
        # Known before the first request: a cached header is only reused for the same credentials.
        creds = await self._auth_for(ep, ref, auth)
        for _ in range(3):
            hdrs = {**headers, **self.authorizer.header(ep.base, ref.path, creds)}
            try:
                resp = await self.session.get(url, headers=hdrs, timeout=self.timeout)
            except aiohttp.ClientConnectorError as e:
                raise _TryNext(errors.NotFound(f"{FIELD}: registry {ep.base} unreachable: {e.os_error}"),
                               unreachable=True) from e
            except aiohttp.ClientError as e:
                raise _TryNext(errors.Unavailable(f"{FIELD}: registry {ep.base}: {e}")) from e
            except TimeoutError as e:
                raise _TryNext(errors.DeadlineExceeded(f"{FIELD}: registry {ep.base} timed out")) from e
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                if challenge and await self.authorizer.answer(ep.base, ref.path, challenge, creds):
                    continue
                err = errors.FailedPrecondition(
                    f"{FIELD}: authentication to {ep.base} for {ref.path} failed"
                    f" ({'credentials refused' if creds else 'no credentials'}): permission denied")
                if ep.mirror:
                    raise _TryNext(err)
                raise err
            if resp.status == 200:
                return resp
            status = resp.status
            body = registry_error_text(await resp.content.read(512))
            resp.release()
            if status == 403:
                err = errors.FailedPrecondition(f"{FIELD}: {ep.base} refused access to {ref.path}: permission denied")
            elif status == 404:
                err = errors.NotFound(f"{FIELD}: {ref.path}/{path} not found on {ep.base}")
            elif status == 429 or status >= 500:
                err = errors.Unavailable(f"{FIELD}: {ep.base} answered {status}{body}")
            else:
                err = errors.FailedPrecondition(f"{FIELD}: {ep.base} answered {status}{body}")
            raise _TryNext(err)
        raise errors.FailedPrecondition(f"{FIELD}: authentication to {ep.base} failed: permission denied")

    async def _each(self, endpoints: list[Endpoint], fn: Callable[[Endpoint], Awaitable[T]]) -> tuple[T, Endpoint]:
        """Try endpoints in order; the origin's error wins when all fail."""
        last: _TryNext | None = None
        for ep in endpoints:
            try:
                return await fn(ep), ep
            except _TryNext as e:
                self.log.info("endpoint failed", endpoint=ep.base, error=str(e.error))
                last = e
        assert last is not None
        raise last.error

    async def fetch_manifest(self, ref: Reference, obj: str, auth: Auth | None,
                             endpoints: list[Endpoint]) -> tuple[bytes, str, str, list[Endpoint]]:
        """(body, media type, digest, endpoints with the one that answered first)."""

        async def one(ep: Endpoint) -> tuple[bytes, str]:
            resp = await self._open(ep, ref, f"manifests/{obj}", {"Accept": ACCEPT}, auth)
            try:
                body = await read_bounded(resp.content, MAX_MANIFEST)
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _TryNext(errors.Unavailable(f"{FIELD}: reading manifest from {ep.base}: {e}")) from e
            finally:
                resp.release()
            if len(body) > MAX_MANIFEST:
                raise _TryNext(errors.FailedPrecondition(f"{FIELD}: manifest larger than {MAX_MANIFEST} bytes"))
            return body, ctype

        (body, ctype), ep = await self._each(endpoints, one)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if obj.startswith("sha256:") and digest != obj:
            raise CorruptBlob(f"{FIELD}: manifest {obj} from {ep.base} has digest {digest}: corrupted")
        try:
            mt = json.loads(body).get("mediaType") or ctype
        except (ValueError, AttributeError) as e:
            raise errors.FailedPrecondition(f"{FIELD}: manifest {digest} is not JSON") from e
        ordered = [ep, *[e for e in endpoints if e != ep]]
        return body, mt, digest, ordered

    async def fetch_blob(self, ref: Reference, desc: Descriptor, dest: Path, auth: Auth | None,
                         endpoints: list[Endpoint], progress: Progress | None = None) -> None:
        """Stream a blob into `dest`, verifying size and digest; `dest` is removed on failure.
        `progress` hears of every chunk flushed, for an unpack that follows the download."""

        async def one(ep: Endpoint) -> None:
            if progress is not None and progress.written:
                # A follower already consumed bytes from the failed endpoint: it cannot rewind.
                raise errors.Unavailable(f"{FIELD}: download of {desc.digest} broke off midway; retry the pull")
            resp = await self._open(ep, ref, f"blobs/{desc.digest}", {}, auth)
            try:
                await self._stream(resp, desc, dest, ep, progress)
            except (aiohttp.ClientError, TimeoutError) as e:
                await asyncio.to_thread(_unlink, dest)
                raise _TryNext(errors.Unavailable(f"{FIELD}: downloading {desc.digest} from {ep.base}: {e}")) from e
            except BaseException:
                await asyncio.to_thread(_unlink, dest)
                raise
            finally:
                resp.release()

        await self._each(endpoints, one)

    async def _stream(self, resp: aiohttp.ClientResponse, desc: Descriptor, dest: Path, ep: Endpoint,
                      progress: Progress | None) -> None:
        hasher = hashlib.sha256()
        f = await asyncio.to_thread(open, dest, "wb")
        size = 0
        try:
            pending: list[bytes] = []
            pending_len = 0

            def flush(bufs: list[bytes]) -> None:
                n = 0
                for b in bufs:
                    hasher.update(b)
                    f.write(b)
                    n += len(b)
                if progress is not None:
                    f.flush()
                    progress.advance(n)

            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > desc.size:
                    raise CorruptBlob(f"{FIELD}: blob {desc.digest} from {ep.base} is larger than {desc.size} "
                                      "bytes: corrupted")
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len >= WRITE_CHUNK:
                    # Batched so a thread hop carries ~1 MB, not one socket read.
                    await asyncio.to_thread(flush, pending)
                    pending, pending_len = [], 0
            if pending:
                await asyncio.to_thread(flush, pending)
        finally:
            await asyncio.to_thread(f.close)
        if size != desc.size:
            raise CorruptBlob(f"{FIELD}: blob {desc.digest} from {ep.base} is truncated ({size} of {desc.size} "
                              "bytes)")
        got = "sha256:" + hasher.hexdigest()
        if got != desc.digest:
            raise CorruptBlob(f"{FIELD}: blob {desc.digest} from {ep.base} has digest {got}: corrupted")


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def select_platform(index: dict[str, Any], digest: str) -> Descriptor:
    """The manifest for this host (linux/<arch>) from an image index or manifest list."""
    arch = host_arch()
    candidates = []
    for i, d in enumerate(index.get("manifests") or []):
        desc = Descriptor.of(d, f"index {digest} entry {i}")
        p = desc.platform
        if p.get("os", "linux") == "linux" and p.get("architecture") == arch:
            if desc.media_type and desc.media_type not in MANIFEST_TYPES:
                continue
            candidates.append(desc)
    if not candidates:
        raise errors.NotFound(f"{FIELD}: image index {digest} has no manifest for linux/{arch}")
    # Prefer the plain entry over variants we cannot judge (v8 for arm64 is the common default).
    candidates.sort(key=lambda d: d.platform.get("variant", "") not in ("", "v8"))
    return candidates[0]
