"""What goes on the error/status channel: metav1.Status JSON (v4+) or plain text (v1-v3)."""

from __future__ import annotations

import json


def exit_code_of(code: int) -> int:
    # Backends may report a signal death as a negative code (asyncio convention); clients expect 128+N.
    return 128 - code if code < 0 else code


def status_v4(code: int | None, error: str | None, cmd: list[str] | None) -> bytes:
    if error is not None:
        body: dict[str, object] = {
            "metadata": {}, "status": "Failure", "message": f"Internal error occurred: {error}",
            "reason": "InternalError", "details": {"causes": [{"message": error}]}, "code": 500,
        }
    elif not code:
        body = {"metadata": {}, "status": "Success"}
    else:
        body = {
            "metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: {_exit_text(code, cmd)}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
        }
    return json.dumps(body, separators=(",", ":")).encode()


def status_text(code: int | None, error: str | None, cmd: list[str] | None) -> bytes:
    """v1-v3 clients read any bytes on the error stream as an error message; success is silence."""
    if error is not None:
        return error.encode()
    if code:
        return f"command terminated with non-zero exit code: {_exit_text(code, cmd)}".encode()
    return b""


def _exit_text(code: int, cmd: list[str] | None) -> str:
    if cmd is None:
        return f"exit code {code}"
    return f"error executing command {cmd}, exit code {code}"
