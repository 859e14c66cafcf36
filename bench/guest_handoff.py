"""On the real kernel (the q35 TCG guest of tests/vm): the handoff against plain kexec, and
many NVMe controllers torn down one at a time against side by side.

Three boots, in one run:
1. plain `kexec -e`: its start → the second kernel's marker;
2. `petitkexec exec`: its start → the second kernel's marker;
3. nine NVMe controllers (the lane's one and 8 more, each behind its own root port), the
   whole machine torn down ROUNDS times each way, alternating `--jobs 1` and the default:
   `exec --kexec /bin/false` tears down, the kexec fails and everything is rolled back, so
   each round starts from the same machine. The teardown's own summary gives wall time and
   critical path.
Times are guest clocks (stage 1's uptime and printk clock, plus the second kernel's uptime at
its marker, as tests/vm/test_scenarios.py measures). Prints a table:
    python bench/guest_handoff.py [--rounds N] [--smp N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm.guest import GuestRun, boot_guest
from tests.vm.images.build import current_images
from tests.vm.images.lanes import X86
from tests.vm.test_scenarios import exec_to_second_seconds, scenario

EXTRA_NVME = 8
SUMMARY = re.compile(r"wall time (\d+) ms; critical path (\d+) ms")


def extra_nvme_args(disks: Path) -> list[str]:
    """8 more NVMe controllers, each behind its own root port at 00:10.0 to 00:17.0."""
    args: list[str] = []
    for n in range(EXTRA_NVME):
        disk = disks / f"nvme{n}.img"
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        args += [
            "-device",
            f"pcie-root-port,id=brp{n},chassis={20 + n},slot={20 + n},bus=pcie.0,"
            f"addr={0x10 + n:#x}",
            "-drive",
            f"if=none,id=bdisk{n},file={disk},format=raw",
            "-device",
            f"nvme,serial=pkbench{n},id=bnvme{n},bus=brp{n}",
            "-device",
            f"nvme-ns,drive=bdisk{n},bus=bnvme{n},nsid=1",
        ]
    return args


def handoff_seconds(images: object, command: str) -> tuple[float, GuestRun]:
    run = boot_guest(scenario(command), images=images, timeout=600)
    if not run.second_up:
        raise SystemExit(f"no second kernel after {command!r}:\n{run.tail()}")
    return exec_to_second_seconds(run), run


def teardown_rounds(images: object, rounds: int, smp: int) -> dict[str, list[tuple[int, int]]]:
    body = "".join(
        # nvme's probe finishes in the background (its reset work): let the rebinds settle.
        f"sleep 5\necho BENCH-ROUND {mode}\npetitkexec exec --kexec /bin/false {flag}\n"
        for _ in range(rounds)
        for mode, flag in (("serial", "--jobs 1"), ("side-by-side", ""))
    )
    with tempfile.TemporaryDirectory() as disks:
        run = boot_guest(
            body,
            images=images,
            extra_qemu_args=[*extra_nvme_args(Path(disks)), "-smp", str(smp)],
            timeout=600 + 120 * rounds,
        )
    found: dict[str, list[tuple[int, int]]] = {"serial": [], "side-by-side": []}
    mode = None
    for line in run.log.splitlines():
        if line.startswith("BENCH-ROUND "):
            mode = line.split()[1]
        elif mode and (match := SUMMARY.search(line)):
            found[mode].append((int(match[1]), int(match[2])))
            mode = None
    if any(len(values) != rounds for values in found.values()):
        raise SystemExit(f"expected {rounds} summaries each way, got {found}:\n{run.tail()}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smp", type=int, default=2, help="vCPUs for the many-NVMe boot")
    options = parser.parse_args()
    images = current_images(X86)

    plain, _ = handoff_seconds(images, "/usr/sbin/kexec-readback -e")
    ours, run = handoff_seconds(images, "petitkexec exec --kexec /usr/sbin/kexec-readback")
    rounds = teardown_rounds(images, options.rounds, options.smp)

    print("| what | measured |\n| --- | --- |")
    print(
        f"| start → second kernel's marker: `exec` vs plain `kexec -e` | "
        f"{ours:.2f} s vs {plain:.2f} s ({ours / plain:.2f}x); petitkexec's part "
        f"{ours - plain:.2f} s |"
    )
    serial = statistics.median(wall for wall, _ in rounds["serial"])
    side = statistics.median(wall for wall, _ in rounds["side-by-side"])
    critical = statistics.median(path for _, path in rounds["side-by-side"])
    print(
        f"| whole teardown, 9 NVMe + 13 other functions, -smp {options.smp}, median of "
        f"{options.rounds}: `--jobs 1` vs default | {serial / 1000:.2f} s vs {side / 1000:.2f} s "
        f"({serial / side:.2f}x); critical path {critical / 1000:.2f} s "
        f"(wall {side / critical:.2f}x of it) |"
    )
    print(f"\nall rounds (wall ms, critical path ms): {rounds}\nlast exec log: {run.log_path}")


if __name__ == "__main__":
    main()
