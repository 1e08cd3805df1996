"""Digest validation, and short renderings of untrusted text for messages.

A digest from a manifest, an image config or index.json becomes a file name in the store, so it is
checked against the OCI image spec's exact form before anything else looks at it: a registered
algorithm and its lowercase hex encoding of the right length. Only sha256 content is stored.
"""

from __future__ import annotations

import re

from shimd import errors

# OCI image spec, "Registered algorithms".
_FORMS = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
SUPPORTED = "sha256"
MAX_SHOWN = 96


def brief(value: object, limit: int = MAX_SHOWN) -> str:
    """repr() of untrusted input, cut so a hostile value never floods an error message or a log line."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def is_valid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    algo, sep, hexd = value.partition(":")
    form = _FORMS.get(algo)
    return bool(sep and form is not None and form.fullmatch(hexd))


def check(value: object, what: str, exc: type[errors.ShimdError] = errors.FailedPrecondition) -> str:
    """The digest itself when it is well formed and of a supported algorithm; else `exc` naming `what`."""
    if not is_valid(value):
        raise exc(f"{what}: invalid digest {brief(value)} (want sha256:<64 lowercase hex>)")
    assert isinstance(value, str)
    algo = value.partition(":")[0]
    if algo != SUPPORTED:
        raise exc(f"{what}: unsupported digest algorithm {algo} (only {SUPPORTED} is supported)")
    return value


def hex_of(value: str, what: str) -> str:
    """The hex part of a sha256 digest, for use as a file name."""
    return check(value, what, errors.FailedPrecondition).partition(":")[2]
