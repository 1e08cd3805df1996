"""Registry credentials: from the PullImage request or the docker config.json credentials file, and
the WWW-Authenticate challenge handling (Basic, Bearer token) of the distribution spec."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from shimd import errors
from shimd.images.digest import brief
from shimd.images.reference import DOCKER_HUB

MAX_TOKEN_RESPONSE = 1 << 20   # a token response is a few KiB; the registry chooses the server


@dataclass(frozen=True)
class Auth:
    """CRI AuthConfig, minus the transport."""

    username: str = ""
    password: str = ""
    auth: str = ""                 # base64("user:pass"), docker style
    server_address: str = ""
    identity_token: str = ""       # OAuth2 refresh token
    registry_token: str = ""       # a bearer token to use as is

    def user_pass(self) -> tuple[str, str] | None:
        if self.username:
            return self.username, self.password
        if self.auth:
            try:
                user, sep, pw = base64.b64decode(self.auth, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError) as e:
                raise errors.InvalidArgument("auth.auth: not base64 of user:password") from e
            if sep:
                return user, pw
            raise errors.InvalidArgument("auth.auth: must encode user:password")
        return None

    @property
    def empty(self) -> bool:
        return not (self.username or self.auth or self.identity_token or self.registry_token)

    def cache_key(self) -> str:
        """Tells credentials apart without keeping them in the key ("" is anonymous)."""
        if self.empty:
            return ""
        fields = (self.username, self.password, self.auth, self.identity_token, self.registry_token)
        return hashlib.sha256("\0".join(fields).encode("utf-8", "surrogatepass")).hexdigest()


def cache_key(auth: Auth | None) -> str:
    return auth.cache_key() if auth is not None else ""


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit` + 1 bytes (one more tells the caller it is too large).
    StreamReader.read(n) returns whatever is buffered, so a body in several packets needs a loop."""
    chunks: list[bytes] = []
    got = 0
    while got <= limit:
        chunk = await content.read(limit + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _host_key(key: str) -> str:
    """'https://index.docker.io/v1/' -> 'docker.io'; 'host:5000' stays."""
    host = urlsplit(key).netloc if "://" in key else key.split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io") else host


def _read_credentials(path: str) -> dict[str, Auth]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise errors.FailedPrecondition(f"registries.credentials_file {path}: unreadable: {e}") from e
    out: dict[str, Auth] = {}
    for key, entry in (data.get("auths") or {}).items():
        if isinstance(entry, dict):
            out[_host_key(key)] = Auth(username=entry.get("username", ""), password=entry.get("password", ""),
                                       auth=entry.get("auth", ""), identity_token=entry.get("identitytoken", ""),
                                       registry_token=entry.get("registrytoken", ""))
    return out


async def lookup(credentials_file: str, host: str) -> Auth | None:
    """Credentials for `host` from the file, read at each pull so edits apply without a restart."""
    if not credentials_file:
        return None
    creds = await asyncio.to_thread(_read_credentials, credentials_file)
    return creds.get(_host_key(host))


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="x",service="y"' -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    key, val, in_quotes, reading_key = "", "", False, True
    for ch in rest + ",":
        if reading_key:
            if ch == "=":
                reading_key = False
            elif ch != "," and not ch.isspace():
                key += ch
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == "," and not in_quotes:
            params[key.lower()] = val
            key, val, reading_key = "", "", True
        else:
            val += ch
    return scheme.lower(), params


class Authorizer:
    """Authorization headers per (registry endpoint, repository, credentials), with cached bearer tokens.

    The credentials are part of the key: a header or token obtained with one pull's credentials
    (or an anonymous token) must never serve a pull that carries other credentials, or none.
    """

    MAX_ENTRIES = 4096

    def __init__(self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        self._session = session
        self._timeout = timeout
        self._headers: dict[tuple[str, str, str], tuple[str, float]] = {}

    def header(self, endpoint: str, repo: str, auth: Auth | None) -> dict[str, str]:
        value, expires = self._headers.get((endpoint, repo, cache_key(auth)), ("", 0.0))
        if value and time.monotonic() < expires:
            return {"Authorization": value}
        return {}

    def _store(self, key: tuple[str, str, str], value: str, expires: float) -> None:
        now = time.monotonic()
        if len(self._headers) >= self.MAX_ENTRIES:
            # Every distinct credential adds an entry: drop the expired ones, then the oldest.
            self._headers = {k: v for k, v in self._headers.items() if v[1] > now}
            while len(self._headers) >= self.MAX_ENTRIES:
                del self._headers[next(iter(self._headers))]
        self._headers[key] = (value, expires)

    async def answer(self, endpoint: str, repo: str, challenge: str, auth: Auth | None) -> bool:
        """Handle a 401 challenge; False when there is nothing new to try (authentication failed)."""
        scheme, params = parse_challenge(challenge)
        user_pass = auth.user_pass() if auth else None
        if scheme == "basic":
            if not user_pass:
                return False
            value = "Basic " + base64.b64encode(f"{user_pass[0]}:{user_pass[1]}".encode()).decode()
            ttl = 3600.0
        elif scheme == "bearer":
            if auth and auth.registry_token:
                value, ttl = f"Bearer {auth.registry_token}", 3600.0
            else:
                token, ttl = await self._fetch_token(params, repo, auth, user_pass)
                value = f"Bearer {token}"
        else:
            raise errors.FailedPrecondition(f"registry {endpoint}: unsupported auth scheme {brief(scheme)}")
        key = (endpoint, repo, cache_key(auth))
        if self._headers.get(key, ("", 0.0))[0] == value:
            return False  # the same credentials were already refused
        self._store(key, value, time.monotonic() + max(ttl - 10, 10))
        return True

    async def _fetch_token(self, params: dict[str, str], repo: str, auth: Auth | None,
                           user_pass: tuple[str, str] | None) -> tuple[str, float]:
        realm = params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise errors.FailedPrecondition(f"registry token realm {brief(realm)} is not an http(s) URL")
        scope = params.get("scope") or f"repository:{repo}:pull"
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            if auth and auth.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": auth.identity_token, "client_id": "shimd",
                        **query}
                resp_cm = self._session.post(realm, data=form, timeout=self._timeout)
            else:
                basic = aiohttp.BasicAuth(*user_pass) if user_pass else None
                resp_cm = self._session.get(realm, params=query, auth=basic, timeout=self._timeout)
            async with resp_cm as resp:
                if resp.status in (401, 403):
                    raise errors.FailedPrecondition(
                        f"image.image: authentication to {realm} failed: {resp.status} (permission denied)")
                if resp.status != 200:
                    raise errors.Unavailable(f"token server {realm} answered {resp.status}")
                raw = await read_bounded(resp.content, MAX_TOKEN_RESPONSE)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise errors.Unavailable(f"token server {realm}: {e}") from e
        if len(raw) > MAX_TOKEN_RESPONSE:
            raise errors.Unavailable(f"token server {realm}: response larger than {MAX_TOKEN_RESPONSE} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise errors.Unavailable(f"token server {realm}: response is not JSON") from e
        if not isinstance(body, dict):
            raise errors.Unavailable(f"token server {realm}: response is not a JSON object")
        token = body.get("token") or body.get("access_token")
        if not token:
            raise errors.Unavailable(f"token server {realm} returned no token")
        try:
            ttl = float(body.get("expires_in") or 60)
        except (TypeError, ValueError):
            ttl = 60.0
        return str(token), ttl
