"""structlog set-up: JSON lines on stderr, with context bound by callers (pod_id, container_id, handler)."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str, **context: object) -> structlog.stdlib.BoundLogger:
    # get_logger with initial values stays lazy: a module-level logger made at import time (before
    # configure) still renders JSON; .bind() here would fix it to the default console output.
    return structlog.get_logger(name, logger_name=name, **context)  # type: ignore[no-any-return]
