"""The headline on the real kernel: N slow devices, plain `kexec -e` against `petitkexec exec`.

The q35 TCG guest of tests/vm with N of QEMU's edu devices bound by the slow test driver
(tests/vm/slowdev/), whose remove() and shutdown() each take T seconds, as an NVMe
controller's shutdown does (about 4.5 s on many drives). Plain `kexec -e` pays N x T: the
kernel's device_shutdown() calls each bound driver's ->shutdown serially. petitkexec unbinds
them side by side (its default --jobs), so it pays about T plus its own start.

Two boots per N, same image: plain `kexec -e` start → the second kernel's marker, and
`petitkexec exec` start → marker, on guest clocks as bench/guest_handoff.py measures. The
critical path is the teardown's own summary. Prints a table:
    python bench/slow_devices.py [--counts 1,4,8,16] [--seconds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.guest_handoff import SUMMARY
from tests.vm.guest import GuestRun, boot_guest
from tests.vm.images.build import Images, current_images
from tests.vm.images.lanes import X86
from tests.vm.slowdev_module import IN_GUEST, build_module, edu_qemu_args, load_lines
from tests.vm.test_scenarios import EXEC, exec_to_second_seconds, scenario

PLAIN = "/usr/sbin/kexec-readback -e"


def slow_boot(images: Images, ko: bytes, count: int, seconds: float, command: str) -> GuestRun:
    ms = round(seconds * 1000)
    run = boot_guest(
        load_lines(count, remove_ms=ms, shutdown_ms=ms) + scenario(command),
        images=images,
        extra_qemu_args=edu_qemu_args(count),
        extra_files={IN_GUEST: ko},
        timeout=600 + 2 * count * seconds,
    )
    if not run.second_up:
        raise SystemExit(f"no second kernel after {command!r} with {count} devices:\n{run.tail()}")
    return run


def critical_path_seconds(run: GuestRun) -> float:
    match = SUMMARY.search(run.log)
    if not match:
        raise SystemExit(f"no teardown summary:\n{run.tail()}")
    return int(match[2]) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--counts", default="1,4,8,16", help="numbers of slow devices")
    parser.add_argument("--seconds", type=float, default=2.0, help="each remove()/shutdown()")
    options = parser.parse_args()
    images = current_images(X86)
    ko = build_module(images).read_bytes()
    rows = []
    for count in (int(c) for c in options.counts.split(",")):
        started = time.monotonic()
        plain = exec_to_second_seconds(slow_boot(images, ko, count, options.seconds, PLAIN))
        ours_run = slow_boot(images, ko, count, options.seconds, EXEC)
        ours = exec_to_second_seconds(ours_run)
        critical = critical_path_seconds(ours_run)
        rows.append((count, plain, ours, critical, time.monotonic() - started))
        print(f"N={count}: plain {plain:.2f} s, petitkexec {ours:.2f} s", file=sys.stderr)

    print(
        f"| N x {options.seconds:g} s | plain `kexec -e` | `petitkexec exec` | ratio | "
        "critical path | wall of both boots |\n| --- | --- | --- | --- | --- | --- |"
    )
    for count, plain, ours, critical, wall in rows:
        print(
            f"| {count} | {plain:.2f} s | {ours:.2f} s | {ours / plain:.2f} | "
            f"{critical:.2f} s | {wall:.0f} s |"
        )


if __name__ == "__main__":
    main()
