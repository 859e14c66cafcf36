"""What the commands act on: the machine's sysfs and /proc, and how to discover and write it.

Tests hand in a simulated kernel. Nothing heavy is imported here: `plan --snapshot` and the
help never load pyudev or the executor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from petitkexec.kernel import Kernel, SysfsWriter
    from petitkexec.model import SystemFacts, Topology

SYSFS_ROOT = Path("/sys")


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(eq=False)
class Environment:
    """What the commands act on; tests hand in a simulated kernel."""

    sysfs_root: Path = SYSFS_ROOT
    proc_root: Path = Path("/proc")
    discover: Callable[[], Topology] | None = None  # None: petitkexec.discovery
    writer: SysfsWriter | None = None  # None: the real one (write(2) on sysfs files)
    euid: int = field(default_factory=os.geteuid)

    def kernel(self) -> Kernel:
        from petitkexec.kernel import Kernel, RealSysfsWriter

        return Kernel(self.sysfs_root, self.writer or RealSysfsWriter())

    def topology(self) -> Topology:
        if self.discover is not None:
            return self.discover()
        from petitkexec.discovery import discover_topology  # pyudev loads only to discover

        return discover_topology(self.sysfs_root)

    def facts(self) -> SystemFacts:
        from petitkexec.facts import gather_facts

        return gather_facts(self.sysfs_root, self.proc_root)
