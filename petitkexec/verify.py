"""Did every device come back? The topology after a kexec compared with a snapshot from before.

No kexec tool tells its user whether the next kernel got every device back (an xHCI that did
not halt, a NIC that stays dark). This is the pure comparison; the CLI takes the snapshot from
a file and the topology from this machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.model import Topology


class Change(Enum):
    MISSING = "missing"  # the function is not there at all
    UNBOUND = "unbound"  # it is there, but the driver it had is not bound
    OTHER_DRIVER = "other-driver"  # it is bound to another driver
    NEW = "new"  # there now, not in the snapshot (reported, not a failure)

    @property
    def is_failure(self) -> bool:
        return self is not Change.NEW


@dataclass(frozen=True)
class Difference:
    bdf: Bdf
    change: Change
    before: str | None  # the driver in the snapshot
    after: str | None  # the driver now

    def __str__(self) -> str:
        if self.change is Change.MISSING:
            return f"{self.bdf} missing (was bound to {self.before or 'no driver'})"
        if self.change is Change.UNBOUND:
            return f"{self.bdf} unbound (was bound to {self.before})"
        if self.change is Change.OTHER_DRIVER:
            return f"{self.bdf} bound to {self.after} (was {self.before})"
        return f"{self.bdf} new (bound to {self.after or 'no driver'})"


def compare(before: Topology, after: Topology) -> tuple[Difference, ...]:
    """Every function of `before` must be in `after`, with the driver it had (if it had one)."""
    differences = []
    for function in before:
        now = after.functions.get(function.bdf)
        if now is None:
            differences.append(Difference(function.bdf, Change.MISSING, function.driver, None))
        elif function.driver is not None and now.driver is None:
            differences.append(Difference(function.bdf, Change.UNBOUND, function.driver, None))
        elif function.driver is not None and now.driver != function.driver:
            differences.append(
                Difference(function.bdf, Change.OTHER_DRIVER, function.driver, now.driver)
            )
    for function in after:
        if function.bdf not in before.functions:
            differences.append(Difference(function.bdf, Change.NEW, None, function.driver))
    return tuple(sorted(differences, key=lambda d: d.bdf))


# How often a function that is not back yet is looked for again: soon at first (a driver
# still probing), then less often, because each look is a whole discovery (seconds of CPU in
# a slow guest, where a 60 s wait spent polling every 0.5 s cost 40 s of CPU).
POLL_S = 0.5
POLL_MAX_S = 4.0


def verify_until(
    discover: Callable[[], Topology], before: Topology, wait_s: float
) -> tuple[Difference, ...]:
    """compare() now, and again until nothing has failed or `wait_s` has passed."""
    ends = time.monotonic() + wait_s
    pause = POLL_S
    while True:
        differences = compare(before, discover())
        left = ends - time.monotonic()
        if not any(d.change.is_failure for d in differences) or left <= 0:
            return differences
        time.sleep(min(pause, left))
        pause = min(pause * 2, POLL_MAX_S)
