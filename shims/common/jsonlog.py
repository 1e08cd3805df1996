"""Tiny JSON-lines logger for shims (structlog would cost resident memory in every shim)."""

from __future__ import annotations

import json
import time

from shims.common.writer import FileWriter

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: every shim would carry it
    from typing import Any


def _now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000 // 1000:06d}Z"


class Logger:
    def __init__(self, writer: FileWriter | None, path: str, debug: bool = False, **context: Any) -> None:
        self.writer, self.path, self.debug_enabled, self.context = writer, path, debug, context

    def bind(self, **context: Any) -> Logger:
        return Logger(self.writer, self.path, self.debug_enabled, **{**self.context, **context})

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if self.writer is None:
            return
        record = {"timestamp": _now(), "level": level, "event": event, **self.context, **fields}
        self.writer.append(self.path, (json.dumps(record, default=str) + "\n").encode())

    def debug(self, event: str, **fields: Any) -> None:
        if self.debug_enabled:
            self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)
