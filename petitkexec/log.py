"""Logging through structlog: a console renderer on a terminal, JSON lines otherwise, never stdout.

structlog is imported when the first event passes the level, not before: importing it pulls in
asyncio (a tenth of a second in a TCG guest), and the default level (warnings) lets almost
nothing through, so most runs never pay for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# The logging module's level numbers, which structlog's filtering logger takes: named here so
# that a run that logs nothing does not import logging (5 ms of every start, bench: `python
# -X importtime -m petitkexec plan`).
DEBUG, INFO, WARNING = 10, 20, 30


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(eq=False)
class _Config:
    """What configure_logging() chose, read by every logger."""

    level: int = WARNING
    structlog_ready: bool = False


_config = _Config()


def configure_logging(*, verbose: bool = False, debug: bool = False) -> None:
    _config.level = DEBUG if debug else INFO if verbose else WARNING
    _config.structlog_ready = False


def _structlog_logger(name: str) -> Any:
    import structlog

    if not _config.structlog_ready:
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
            wrapper_class=structlog.make_filtering_bound_logger(_config.level),
            # Logs share stderr with progress lines; stdout is kept for --json and the plan.
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=False,
        )
        _config.structlog_ready = True
    return structlog.get_logger(name)


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Logger:
    """The few methods petitkexec logs with; an event below the level costs a comparison."""

    name: str

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if level >= _config.level:
            _structlog_logger(self.name).log(level, event, **fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(WARNING, event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


@contextmanager
def timed(logger: Logger, event: str, **fields: object) -> Iterator[dict[str, object]]:
    """Log how long a phase took; the caller may add fields to the yielded dict."""
    extra: dict[str, object] = {}
    started = time.monotonic()
    try:
        yield extra
    finally:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        logger.info(event, elapsed_ms=elapsed_ms, **fields, **extra)
