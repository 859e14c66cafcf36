"""How long planning takes on a large machine: 10,000+ functions, 64 bridges, SR-IOV VFs.

Prints absolute times and ratios measured in this one run (these machines are noisy):
    python bench/plan_scale.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.plan import build_plan
from petitkexec.policy import Policy
from petitkexec.render import plan_to_json, plan_tree
from petitkexec.snapshot import load_snapshot, snapshot_to_json

BRIDGES = 64
VFS_PER_PF = 150
ENDPOINTS_PER_BUS = 5


def big_topology() -> tuple[Topology, SystemFacts]:
    functions = []
    for index in range(BRIDGES):
        port = Bdf(0, 0, 1 + index // 8, index % 8)
        bus = index + 1
        functions.append(
            PciFunction(
                port,
                0x8086,
                0x1234,
                0x060400,
                0x81,
                0x0507,
                driver="pcieport",
                driver_can_unbind=True,
            )
        )
        pf = Bdf(0, bus, 0, 0)
        functions.append(
            PciFunction(
                pf,
                0x15B3,
                0x101B,
                0x020000,
                0x80,
                0x0406,
                driver="mlx5",
                driver_can_unbind=True,
                parent=port,
            )
        )
        for function in range(1, 1 + ENDPOINTS_PER_BUS):
            functions.append(
                PciFunction(
                    Bdf(0, bus, 0, function),
                    0x15B3,
                    0x101B,
                    0x020000,
                    0x80,
                    0x0406 if function % 2 else 0x0002,
                    driver=None if function % 2 else "mlx5",
                    driver_can_unbind=True,
                    parent=port,
                )
            )
        for vf in range(VFS_PER_PF):
            slot, fn = divmod(8 + vf, 8)
            functions.append(
                PciFunction(
                    Bdf(0, bus, slot, fn),
                    0x15B3,
                    0x101C,
                    0x020000,
                    0,
                    0x0406,
                    driver="mlx5" if vf % 3 else None,
                    driver_can_unbind=True,
                    parent=port,
                    physfn=pf,
                )
            )
    needed = {Bdf(0, 1, 0, 0): "backs / mounted rw"}
    return Topology.from_functions(functions), SystemFacts(needed=needed)


def best_of(repeat: int, action) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    topology, facts = big_topology()
    policy = Policy(hot_reset=True)
    with tempfile.TemporaryDirectory() as scratch:
        snapshot = Path(scratch) / "big.json"
        snapshot.write_text(json.dumps(snapshot_to_json(topology, facts)))
        plan = build_plan(topology, policy, facts)
        results = {
            "build_plan": best_of(repeat, lambda: build_plan(topology, policy, facts)),
            "load_snapshot": best_of(repeat, lambda: load_snapshot(snapshot)),
            "render_tree": best_of(repeat, lambda: plan_tree(topology, plan)),
            "render_json": best_of(repeat, lambda: json.dumps(plan_to_json(topology, plan))),
            "cli plan --snapshot --json": best_of(
                repeat,
                lambda: subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "petitkexec",
                        "plan",
                        "--hot-reset",
                        "--json",
                        "--snapshot",
                        str(snapshot),
                    ],
                    check=True,
                    capture_output=True,
                ),
            ),
            "cli --version (start-up)": best_of(
                repeat,
                lambda: subprocess.run(
                    [sys.executable, "-m", "petitkexec", "--version"],
                    check=True,
                    capture_output=True,
                ),
            ),
        }
    print(
        f"topology: {len(topology)} functions, {BRIDGES} bridges, "
        f"{BRIDGES * VFS_PER_PF} VFs; plan: {len(plan.steps)} steps"
    )
    for name, (best, median) in results.items():
        print(f"{name:<28} best {best * 1000:8.1f} ms   median {median * 1000:8.1f} ms")
    cli_best = results["cli plan --snapshot --json"][0]
    print(f"ratio build_plan / cli total: {results['build_plan'][0] / cli_best:.2f}")
    print(f"ratio start-up / cli total:   {results['cli --version (start-up)'][0] / cli_best:.2f}")


if __name__ == "__main__":
    main()
