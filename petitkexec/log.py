"""structlog set-up: a console renderer on a terminal, JSON lines otherwise, never stdout."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog


def configure_logging(*, verbose: bool = False, debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Logs share stderr with progress lines; stdout is kept for --json and the plan.
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


@contextmanager
def timed(logger: Any, event: str, **fields: object) -> Iterator[dict[str, object]]:
    """Log how long a phase took; the caller may add fields to the yielded dict."""
    extra: dict[str, object] = {}
    started = time.monotonic()
    try:
        yield extra
    finally:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        logger.info(event, elapsed_ms=elapsed_ms, **fields, **extra)
