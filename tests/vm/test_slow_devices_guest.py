"""The headline on the real kernel, in one boot: 8 slow devices (QEMU's edu, bound by
tests/vm/slowdev/, remove() and shutdown() 2 s each, as an NVMe controller's shutdown takes
about 4.5 s) torn down side by side by `petitkexec exec` with its defaults.

Plain `kexec -e` cannot be measured in the same boot (it is the handoff), but a floor for it
can: its device_shutdown() (drivers/base/core.c) calls each bound driver's ->shutdown
serially, so plain = (kexec start → marker with these devices unbound, measured in this
boot) + at least 8 x 2 s. bench/slow_devices.py measures plain itself, for N = 1, 4, 8, 16.
One of the 8 is sloppy (its remove() leaves bus mastering on): petitkexec clears it, and
busybox's read-back right before the kexec syscall shows it off.

A second boot has a remove() that does not return: the default unbind deadline (5 s) stops
the teardown, exit 5, no handoff, the rest rolled back.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from bench.guest_handoff import SUMMARY
from tests.vm.guest import GuestRun
from tests.vm.slowdev_module import (
    IN_GUEST,
    MODULE,
    build_module,
    edu_bdf,
    edu_qemu_args,
    load_lines,
)
from tests.vm.test_scenarios import EXEC, NVME, exec_to_second_seconds, scenario

pytestmark = pytest.mark.vm

COUNT = 8
SECONDS = 2.0
# End to end, against the floor: measured 0.51 on a quiet machine and 0.91 at a load average
# of 10 (CI runs two guests side by side on two cores). petitkexec's own Python start under
# TCG (5.5 s quiet, 9 s loaded; 0.25 s on a host) grows with the load, the 8 x 2 s does not.
# The bench's 0.5 target is for the measured plain on a quiet machine; here: not slower.
RATIO_BOUND = 1.0
Boot = Callable[..., GuestRun]


def test_eight_slow_devices_are_torn_down_side_by_side(
    boot: Boot, record_timing: Callable[[str, str], None]
) -> None:
    sloppy = edu_bdf(COUNT - 1)
    ms = round(SECONDS * 1000)
    run = boot(
        load_lines(COUNT, remove_ms=ms, shutdown_ms=ms, sloppy_remove=sloppy)
        + scenario(f"{EXEC}\necho PK-EXIT $?\n"),
        extra_qemu_args=edu_qemu_args(COUNT),
        extra_files={IN_GUEST: build_module().read_bytes()},
    )
    assert f"SLOWDEV-BOUND {COUNT}" in run.log, run.tail()
    assert run.second_up, run.tail(120)
    for n in range(COUNT):
        assert f"{edu_bdf(n)} unbind           done: unbound from {MODULE}" in run.log, run.tail()
    # petitkexec read PCI_COMMAND back after the unbind and cleared what the driver left on.
    assert f"{sloppy} unbind           done: unbound from {MODULE}; driver left bus master on" in (
        run.log
    ), run.tail(120)
    readback = run.readback("pre-kexec")
    edus = [readback[edu_bdf(n)] for n in range(COUNT)]
    loud = {line.bdf: line.command for line in edus if line.driver is not None or line.bus_master}
    assert loud == {}, run.tail(120)

    summary = SUMMARY.search(run.log)
    assert summary, run.tail()
    wall, critical = int(summary[1]) / 1000, int(summary[2]) / 1000
    # Side by side: the whole teardown takes about one remove(), not eight.
    assert SECONDS <= critical <= wall < COUNT * SECONDS / 2, (wall, critical)

    ours = exec_to_second_seconds(run)
    kexec_part = run.kexec_to_second_guest_seconds
    assert kexec_part is not None, run.tail()
    plain_floor = kexec_part + COUNT * SECONDS
    record_timing(
        f"{COUNT} slow devices: petitkexec start -> marker vs plain kexec -e's floor",
        f"{ours:.2f}s vs {plain_floor:.2f}s ({ours / plain_floor:.2f}x); teardown {wall:.2f}s, "
        f"critical path {critical:.2f}s",
    )
    assert ours <= RATIO_BOUND * plain_floor, (ours, plain_floor)


def test_a_remove_that_never_returns_stops_the_handoff(boot: Boot) -> None:
    hung, other = edu_bdf(0), edu_bdf(1)
    run = boot(
        load_lines(2, remove_ms=500, shutdown_ms=500, hang_remove=hung)
        + f"{EXEC}\necho PK-EXIT $?\nreadback after\n"
        # Let the stuck remove() return, so that poweroff's device_shutdown() gets the lock.
        + f"echo none > /sys/module/{MODULE}/parameters/hang_remove\n",
        extra_qemu_args=edu_qemu_args(2),
        extra_files={IN_GUEST: build_module().read_bytes()},
        poweroff_grace=10,
    )
    assert "SLOWDEV-BOUND 2" in run.log, run.tail()
    assert "PK-EXIT 5" in run.log, run.tail(120)
    assert re.search(
        rf"{hung} unbind +hung: {MODULE} remove\(\) did not return within 5(\.0)? s", run.log
    ), run.tail(120)
    assert "KEXEC-START" not in run.log and not run.second_up, run.tail(120)
    after = run.readback("after")  # the rest was rolled back: drivers bound again
    assert after[other].driver == MODULE and after[NVME].driver == "nvme", run.tail(120)
    assert "reboot: Power down" in run.log and not run.poweroff_hung, run.tail(120)
