"""A second look at what the running system needs, right before the first teardown step.

The busy scan runs before `kexec -l`, which can take seconds; a disk mounted, a device opened
or a network block device connected meanwhile would otherwise be torn down under its user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from petitkexec.bdf import Bdf
from petitkexec.model import SystemFacts


def look_again(
    facts: SystemFacts, gather: Callable[[], SystemFacts]
) -> tuple[SystemFacts, dict[Bdf, str]]:
    """`facts` with every function needed now but not at the scan added, and those functions
    with why ("appeared after the scan: ..."). Nothing is ever taken away: a function
    protected at the scan stays protected."""
    now = gather()
    appeared = {
        bdf: f"appeared after the scan: {reason}"
        for bdf, reason in now.needed.items()
        if bdf not in facts.needed
    }
    if not appeared:
        return facts, {}
    return dataclasses.replace(facts, needed={**facts.needed, **appeared}), appeared
