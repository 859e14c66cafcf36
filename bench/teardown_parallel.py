"""What side-by-side unbinds buy: the same simulated machine torn down with --jobs 1 and 8.

Each of DEVICES endpoints takes REMOVE_S in its remove() (NVMe shutdown notifications and NIC
firmware handshakes take this long on real hardware). Prints times and the ratio of one run:
    python bench/teardown_parallel.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petitkexec.execute import ExecutionOptions, Teardown
from petitkexec.model import SystemFacts
from petitkexec.plan import build_plan
from petitkexec.policy import Policy
from tests.simkernel import SimFunction, SimKernel, root_port

DEVICES = 16
REMOVE_S = 0.1


def machine(root: Path) -> SimKernel:
    functions = []
    for index in range(DEVICES):
        port = f"0000:00:{2 + index // 8:02x}.{index % 8}"
        functions.append(root_port(port))
        functions.append(
            SimFunction(
                f"0000:{index + 1:02x}:00.0", parent=port, driver="nvme", remove_seconds=REMOVE_S
            )
        )
    return SimKernel(root / "sys", functions)


def teardown_seconds(jobs: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        sim = machine(Path(scratch))
        topology = sim.topology()
        plan = build_plan(topology, Policy(), SystemFacts())
        started = time.perf_counter()
        report = Teardown(sim.kernel, topology, plan, ExecutionOptions(jobs=jobs)).run()
        elapsed = time.perf_counter() - started
        assert not report.failed, report.failed
        return elapsed


def main() -> None:
    serial = teardown_seconds(1)
    parallel = teardown_seconds(8)
    print(f"{DEVICES} devices behind {DEVICES} root ports, remove() {REMOVE_S * 1000:.0f} ms each")
    print(f"--jobs 1: {serial * 1000:8.1f} ms")
    print(f"--jobs 8: {parallel * 1000:8.1f} ms")
    print(f"ratio jobs1/jobs8: {serial / parallel:.1f}x")


if __name__ == "__main__":
    main()
