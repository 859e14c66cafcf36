"""The scheduler on the simulated kernel: wall time against the critical path and --jobs 1.

Three machines, each torn down with the default --jobs and with --jobs 1, in one run:
- 16 NVMe drives behind 16 root ports, remove() 500 ms each (the slow end of NVMe shutdown);
- a mix: 4 slow NVMe (500 ms) and 12 fast NICs (20 ms), each behind its own root port;
- a deep chain: 6 switch levels with a slow NVMe (500 ms) at the bottom, fast NICs beside it.
Target: wall <= 1.15 x critical path + 50 ms. Prints a table:
    python bench/teardown_schedule.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petitkexec.execute import Teardown
from petitkexec.model import SystemFacts
from petitkexec.plan import build_plan
from petitkexec.policy import Policy
from petitkexec.settings import ExecutionOptions
from tests.simkernel import SimFunction, root_port

SLOW_S, FAST_S = 0.5, 0.02
# sysfs lives in memory: the simulated tree goes on a tmpfs when there is one, or every
# attribute the parent reads costs a disk file system's open() (10-20x sysfs's).
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def behind_root_ports(seconds: list[float]) -> list[SimFunction]:
    functions = []
    for index, remove_s in enumerate(seconds):
        port = f"0000:00:{2 + index // 8:02x}.{index % 8}"
        functions.append(root_port(port))
        functions.append(
            SimFunction(f"0000:{index + 1:02x}:00.0", parent=port, remove_seconds=remove_s)
        )
    return functions


def deep_chain() -> list[SimFunction]:
    functions, parent = [], None
    for depth in range(6):
        bridge = f"0000:{depth:02x}:01.0"
        functions.append(root_port(bridge, parent=parent))
        nic = f"0000:{depth + 1:02x}:02.0"  # a fast NIC beside the chain at every level
        functions.append(SimFunction(nic, parent=bridge, remove_seconds=FAST_S))
        parent = bridge
    functions.append(
        SimFunction("0000:06:00.0", parent=parent, driver="nvme", remove_seconds=SLOW_S)
    )
    return functions


MACHINES: dict[str, Callable[[], list[SimFunction]]] = {
    "16 NVMe x 500 ms": lambda: behind_root_ports([SLOW_S] * 16),
    "4 slow + 12 fast": lambda: behind_root_ports([SLOW_S] * 4 + [FAST_S] * 12),
    "deep chain, slow leaf": deep_chain,
}


def teardown(functions: list[SimFunction], jobs: int | None) -> tuple[float, float]:
    """(wall ms, critical path ms) of one teardown."""
    from tests.simkernel import SimKernel

    with tempfile.TemporaryDirectory(dir=SCRATCH) as scratch:
        sim = SimKernel(
            Path(scratch) / "sys",
            [SimFunction(**{**f.__dict__, "driver": f.driver or "e1000e"}) for f in functions],
        )
        topology = sim.topology()
        plan = build_plan(topology, Policy(), SystemFacts())
        began = time.perf_counter()
        report = Teardown(sim.kernel, topology, plan, ExecutionOptions(jobs=jobs)).run()
        wall_ms = (time.perf_counter() - began) * 1000
        assert not report.failed, report.failed
        return wall_ms, report.critical_path_ms


def main() -> None:
    print(
        f"{'machine':<24}{'wall':>9}{'critical':>10}{'wall/crit':>11}{'target':>9}"
        f"{'jobs 1':>9}{'jobs1/wall':>12}"
    )
    for name, build in MACHINES.items():
        functions = build()
        wall, critical = teardown(functions, None)
        serial, _ = teardown(functions, 1)
        target = 1.15 * critical + 50
        print(
            f"{name:<24}{wall:8.0f}ms{critical:8.0f}ms{wall / critical:10.2f}x"
            f"{'  met' if wall <= target else ' MISSED':>9}{serial:8.0f}ms{serial / wall:11.1f}x"
        )


if __name__ == "__main__":
    main()
