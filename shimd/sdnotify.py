"""systemd readiness notification (sd_notify protocol) for `Type=notify` units.

The protocol is one datagram of newline-separated KEY=VALUE pairs sent to the unix socket named by
$NOTIFY_SOCKET ("@name" means the abstract namespace). Outside systemd the variable is unset and
every call is a no-op, so the daemon never depends on being supervised.
"""

from __future__ import annotations

import os
import socket

from shimd import log

_log = log.get("sdnotify")


def _address(raw: str) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and other address families are not used for a node daemon


def notify(*fields: str, env: dict[str, str] | None = None) -> bool:
    """Send the fields (e.g. "READY=1") to the service manager; True when a datagram went out.

    A non-blocking datagram send to a local socket never waits, so it is safe on the event loop.
    """
    addr = _address((env if env is not None else os.environ).get("NOTIFY_SOCKET", ""))
    if addr is None or not fields:
        return False
    payload = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.setblocking(False)
            s.sendto(payload, addr)
    except OSError as e:
        # A missing notify socket must not stop the runtime; systemd will time the start out itself.
        _log.warning("sd_notify failed", error=str(e), fields=list(fields))
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))


def stopping() -> bool:
    return notify("STOPPING=1")
