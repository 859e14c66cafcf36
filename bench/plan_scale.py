"""How long planning takes on large machines: 64 bridges with SR-IOV NICs, about 1,000 and
about 10,000 functions (9 or 150 VFs per PF).

Prints absolute times, the growth from 1k to 10k (target <= 12x) and the whole CLI against a
bare interpreter, all measured in this one run (these machines are noisy):
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
VF_COUNTS = {"1k": 9, "10k": 150}  # per PF: 1,024 and 10,048 functions
ENDPOINTS_PER_BUS = 5


def big_topology(vfs_per_pf: int) -> tuple[Topology, SystemFacts]:
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
        for vf in range(vfs_per_pf):
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


def measure(repeat: int, vfs_per_pf: int, scratch: Path) -> dict[str, float]:
    """Best times (s) for one machine size."""
    topology, facts = big_topology(vfs_per_pf)
    policy = Policy(hot_reset=True)
    snapshot = scratch / f"machine-{vfs_per_pf}.json"
    snapshot.write_text(json.dumps(snapshot_to_json(topology, facts)))
    plan = build_plan(topology, policy, facts)
    cli = [sys.executable, "-m", "petitkexec", "plan", "--hot-reset", "--json"]
    return {
        "functions": len(topology),
        "build_plan": best_of(repeat, lambda: build_plan(topology, policy, facts))[0],
        "load_snapshot": best_of(repeat, lambda: load_snapshot(snapshot))[0],
        "render_tree": best_of(repeat, lambda: plan_tree(topology, plan))[0],
        "render_json": best_of(repeat, lambda: json.dumps(plan_to_json(topology, plan)))[0],
        "cli plan --snapshot --json": best_of(
            repeat,
            lambda: subprocess.run(
                [*cli, "--snapshot", str(snapshot)], check=True, capture_output=True
            ),
        )[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as scratch:
        sizes = {name: measure(repeat, vfs, Path(scratch)) for name, vfs in VF_COUNTS.items()}
    bare = best_of(repeat, lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))[0]
    small, large = sizes["1k"], sizes["10k"]
    print(f"{'best of ' + str(repeat):<28}{'1k':>10}{'10k':>10}{'growth':>9}")
    for name in ("functions", "build_plan", "load_snapshot", "render_tree", "render_json"):
        unit, scale = ("", 1) if name == "functions" else (" ms", 1000)
        print(
            f"{name:<28}{small[name] * scale:8.0f}{unit:<2}{large[name] * scale:8.0f}{unit:<2}"
            f"{large[name] / small[name]:8.1f}x"
        )
    whole = "cli plan --snapshot --json"
    print(
        f"{whole:<28}{small[whole] * 1000:8.0f} ms{large[whole] * 1000:8.0f} ms"
        f"{large[whole] / small[whole]:8.1f}x   (target at 10k: <= 500 ms, growth <= 12x)"
    )
    print(
        f"bare interpreter (python -c pass) {bare * 1000:.0f} ms; 10k whole CLI less that: "
        f"{(large[whole] - bare) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
