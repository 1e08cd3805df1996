"""Single-use, expiring tokens binding a streaming URL to the CRI request that produced it."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: list[str]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool
    kind: str = field(default="exec", init=False)


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool
    kind: str = field(default="attach", init=False)


@dataclass(frozen=True)
class PortForwardRequest:
    pod_id: str
    ports: list[int]
    kind: str = field(default="portforward", init=False)


StreamRequest = ExecRequest | AttachRequest | PortForwardRequest


class TokenCache:
    """Tokens live `ttl` seconds and are consumed by their first use, valid or not for the path."""

    # Bounds memory if a client requests URLs and never uses them (kubelet caps its cache too).
    MAX_TOKENS = 10000

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._tokens: dict[str, tuple[float, StreamRequest]] = {}

    def _prune(self, now: float) -> None:
        for token in [t for t, (exp, _) in self._tokens.items() if exp <= now]:
            del self._tokens[token]

    def insert(self, request: StreamRequest) -> str:
        now = time.monotonic()
        self._prune(now)
        if len(self._tokens) >= self.MAX_TOKENS:
            # Oldest first: dicts keep insertion order and every entry has the same ttl.
            del self._tokens[next(iter(self._tokens))]
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (now + self._ttl, request)
        return token

    def consume(self, token: str, kind: str) -> StreamRequest | None:
        """The request bound to token if it is live and of this kind; the token is gone afterwards."""
        entry = self._tokens.pop(token, None)
        if entry is None:
            return None
        expires, request = entry
        if expires <= time.monotonic() or request.kind != kind:
            return None
        return request

    def __len__(self) -> int:
        return len(self._tokens)
