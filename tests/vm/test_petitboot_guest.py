"""The petitboot restart path on the real kernel: busybox init as PID 1 with a petitboot-style
inittab whose `restart` action is contrib/petitboot/petitkexec-restart.

One boot, three passes through init (tests/vm/guest-petitboot/menu):
1. nothing loaded: petitkexec refuses in preflight (exit 3), the plain `kexec -f -e` fails
   too, and init starts again;
2. the kernel loaded as pb-discover does (`kexec -l`), and the kexec refusing once after the
   teardown: petitkexec rolls back (exit 4) and init starts again with every driver back;
3. the same kernel: the teardown, `kexec -f -e`, and the second kernel's marker.
What is checked comes from busybox's read-backs and the second kernel, not from petitkexec.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import EXPECTED_DRIVERS, GuestRun
from tests.vm.test_scenarios import assert_second_kernel_reprobed

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
RESTART = "usr/libexec/petitkexec/petitkexec-restart"


def petitboot_files() -> dict[str, bytes]:
    """The run's extra files: the inittab, the init actions, the restart script as
    contrib/petitboot ships it, and the test's kexec (executable bits set by sysinit)."""
    scripts = HERE / "guest-petitboot"
    return {
        "etc/inittab": (scripts / "inittab").read_bytes(),
        "etc/pk-petitboot/sysinit": (scripts / "sysinit").read_bytes(),
        "etc/pk-petitboot/menu": (scripts / "menu").read_bytes(),
        "usr/sbin/kexec-pbtest": (scripts / "kexec-pbtest").read_bytes(),
        RESTART: (REPO_ROOT / "contrib" / "petitboot" / "petitkexec-restart").read_bytes(),
    }


@pytest.fixture(scope="module")
def petitboot_run(vm_images, record_timing) -> GuestRun:  # type: ignore[no-untyped-def]
    from tests.vm.guest import boot_guest

    run = boot_guest(
        "",  # /init is not run: busybox init is (rdinit=)
        images=vm_images,
        load_second=False,
        extra_files=petitboot_files(),
        # The kernel puts unknown `name=value` parameters in init's environment, which busybox
        # init passes on to its restart action.
        kernel_append="rdinit=/sbin/init KEXEC=/usr/sbin/kexec-pbtest",
        timeout=600,
    )
    record_timing("petitboot restart (3 passes) wall", f"{run.wall_seconds:.1f}s ({run.log_path})")
    return run


def section(run: GuestRun, start: str, end: str) -> str:
    """The console between the first line containing `start` and the next containing `end`."""
    log = run.log
    begin = log.index(start)
    return log[begin : log.index(end, begin)]


def drivers(run: GuestRun, tag: str) -> dict[str, str | None]:
    return {bdf: line.driver for bdf, line in run.readback(tag).items()}


def test_nothing_loaded_falls_back_to_plain_kexec_then_back_to_the_menu(
    petitboot_run: GuestRun,
) -> None:
    run = petitboot_run
    first = section(run, "PETITBOOT-RESTART pass=1", "PETITBOOT-MENU pass=2")
    assert "PETITBOOT-SHUTDOWN-ACTIONS" in first, run.tail(150)
    assert "petitkexec-restart: petitkexec exec ended with 3" in first, first
    # The plain kexec petitboot would have run: kexec-tools finds nothing loaded.
    assert "KEXEC-START" in first and "args=-f -e" in first, first
    assert "Nothing has been loaded" in first, first
    assert "no kexec; back to the boot menu" in first
    assert drivers(run, "restart-1") == drivers(run, "menu-1") == EXPECTED_DRIVERS


def test_a_refused_handoff_rolls_back_and_init_brings_the_menu_back(
    petitboot_run: GuestRun,
) -> None:
    run = petitboot_run
    second = section(run, "PETITBOOT-RESTART pass=2", "PETITBOOT-MENU pass=3")
    assert "PETITBOOT-LOADED rc=0 kexec_loaded=1" in run.log, run.tail(150)
    assert "KEXEC-REFUSED-ONCE args=-f -e" in second, second
    # The kexec was refused after the teardown: every driver was off then.
    torn_down = drivers(run, "restart-2")
    assert {b: d for b, d in torn_down.items() if d is not None} == {}, second
    assert "returned 1: kexec refused by the test" in second, second
    assert "petitkexec-restart: petitkexec exec ended with 4" in second, second
    assert "no kexec; back to the boot menu" in second
    # The restart action's report reached the kernel log, where the menu's shell reads it.
    kernel_log = [line for line in run.log.splitlines() if line.startswith("PETITBOOT-KMSG ")]
    assert [line.split("petitkexec-restart: ", 1)[1] for line in kernel_log] == [
        "petitkexec exec ended with 3",
        "petitkexec exec ended with 3",
        "petitkexec exec ended with 4",
    ], kernel_log
    assert drivers(run, "menu-3") == EXPECTED_DRIVERS, run.tail(150)


def test_the_third_pass_tears_down_and_kexecs_into_the_second_kernel(
    petitboot_run: GuestRun,
) -> None:
    run = petitboot_run
    assert "PETITBOOT-RESTART pass=3" in run.log, run.tail(150)
    assert "PETITBOOT-POWEROFF" not in run.log
    assert re.search(r"^KEXEC-START uptime=\S+ args=-f -e$", run.log, re.M), run.tail(150)
    readback = run.readback("restart-3")
    loud = {b: r for b, r in readback.items() if r.driver is not None or r.bus_master}
    assert loud == {}, run.tail(150)
    assert "Traceback" not in run.log
    assert_second_kernel_reprobed(run)
