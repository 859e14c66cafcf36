"""Signals during a run: recorded, never acted on where they land.

From the first write to the kernel until the handoff or the end of the rollback, a signal's
default action (or Python's KeyboardInterrupt, raised wherever the interpreter happens to be)
would leave devices unbound with no rollback, or cut a rollback short and lose its results.
So SIGINT, SIGTERM, SIGHUP and SIGQUIT are only recorded here: the step loop issues no new
step, no handoff is attempted, and a rollback already running runs to its end and is
reported. SIGPIPE stays ignored, as the interpreter sets it at start-up: a report written to a
closed pipe fails with EPIPE, an exception like any other, which is rolled back.

Forked children (petitkexec.deadline) ignore these signals: a Ctrl-C reaches the whole
process group, and a child killed by it would never report what its write did.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(eq=False)
class StopSignals:
    """The stop signals received while installed, in order, by name (`SIGTERM`)."""

    received: list[str] = field(default_factory=list)
    _depth: int = 0
    _previous: dict[int, Any] = field(default_factory=dict)

    @property
    def first(self) -> str | None:
        return self.received[0] if self.received else None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Record stop signals for the duration; nested uses share the outermost one."""
        if self._depth == 0:
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)


def ignore_in_child() -> None:
    """In a forked child: the parent decides what a stop signal means, not the child."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
