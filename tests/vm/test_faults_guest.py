"""The starred rows of the README's failure table, on the real kernel in the q35 guest.

The guest image has no ldconfig (as firmware images): every scenario here and in
test_scenarios.py runs discovery with libudev loaded by its soname. The read-backs are
busybox's (tests/vm/guest/readback), not petitkexec's report."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import EXPECTED_DRIVERS, VIRTFS_BDF, GuestRun
from tests.vm.images.lanes import X86
from tests.vm.test_scenarios import EXEC, NVME, assert_second_kernel_reprobed, scenario

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]
VFS = ("0000:01:00.1", "0000:01:00.2")


def drivers(run: GuestRun, tag: str) -> dict[str, str | None]:
    return {bdf: line.driver for bdf, line in run.readback(tag).items()}


def assert_no_traceback(run: GuestRun) -> None:
    assert "Traceback" not in run.log and "libudev not found" not in run.log, run.tail(120)


def test_bare_environment_finds_kexec_by_absolute_path_never_in_the_working_directory(
    boot: Boot,
) -> None:
    """Row 17: `env -i` (no PATH) and a `kexec` in the working directory."""
    run = boot(
        scenario(
            "mkdir -p /tmp/cwd && cd /tmp/cwd\n"
            "printf '#!/bin/sh\\necho WRONG-KEXEC-RAN\\n' > kexec && chmod 755 kexec\n"
            # Python itself, not a shell script: busybox sh would set a PATH of its own.
            "env -i /usr/bin/python3.11 -m petitkexec exec\necho PK-EXIT $?\n"
        )
    )
    assert "handing off: /usr/sbin/kexec -e" in run.log, run.tail(120)
    assert "WRONG-KEXEC-RAN" not in run.log
    assert_no_traceback(run)
    assert_second_kernel_reprobed(run)


def test_failed_handoffs_bring_back_every_driver_and_the_sriov_vfs(boot: Boot) -> None:
    """Rows 7 and 18: kexec returns, or cannot be executed at all, with a PF's VFs torn down."""
    run = boot(
        scenario(
            "setup-sriov 2 || exit 9\n"
            "readback before\n"
            "petitkexec exec --kexec /bin/false\necho PK-EXIT-FALSE $?\n"
            "readback after-false\n"
            "printf 'not a program' > /tmp/garbage && chmod 755 /tmp/garbage\n"
            "petitkexec exec --kexec /tmp/garbage\necho PK-EXIT-GARBAGE $?\n"
            "readback after-garbage\n"
        )
    )
    assert "PK-EXIT-FALSE 4" in run.log and "PK-EXIT-GARBAGE 4" in run.log, run.tail(120)
    assert "handoff failed: /tmp/garbage -e returned 126: cannot run /tmp/garbage" in run.log
    assert run.log.count("rollback: restore 2 VFs on 0000:01:00.0: ok") == 2, run.tail(120)
    before = drivers(run, "before")
    assert all(before[vf] == "nvme" for vf in VFS), run.tail(120)
    for tag in ("after-false", "after-garbage"):
        after = drivers(run, tag)
        # The VFs are back (sriov_numvfs restored) and nvme was bound to them again, but QEMU's
        # secondary controllers went offline with the PF's remove(): that NVMe virtualization
        # management state is the device's, outside the kernel, so their probe fails later.
        assert set(after) == set(before), run.tail(120)
        assert {b: d for b, d in after.items() if b not in VFS} == {
            b: d for b, d in before.items() if b not in VFS
        }
    assert_no_traceback(run)


def test_sigterm_mid_teardown_stops_rolls_back_and_exits_130_with_ldconfig_present(
    boot: Boot,
) -> None:
    """Row 8, with the image as a distribution has it (ldconfig there: pyudev's own lookup)."""
    ldconfig = (X86.cache() / "pkgroot" / "sbin" / "ldconfig").read_bytes()
    run = boot(
        scenario(
            "chmod 755 /sbin/ldconfig && /sbin/ldconfig -p | grep -q libudev.so.1 "
            "&& echo LDCONFIG-OK\n"
            "readback before\n"
            f"{EXEC} --hot-reset 2>/tmp/err &\npid=$!\n"
            # The root ports' unbind lines come when their wave ends; then the resets (2 s
            # each under TCG) run: SIGTERM lands in the middle of the teardown.
            "n=0; while ! grep -q 'unbound from pcieport' /tmp/err && [ $n -lt 600 ]; do "
            "sleep 0.1; n=$((n + 1)); done\n"
            "kill -TERM $pid; wait $pid; echo PK-EXIT $?\n"
            "cat /tmp/err\nreadback after\n"
        ),
        extra_files={"sbin/ldconfig": ldconfig},
    )
    assert "LDCONFIG-OK" in run.log, run.tail(120)
    assert "PK-EXIT 130" in run.log, run.tail(120)
    assert "stopped: interrupted by SIGTERM" in run.log
    assert "KEXEC-START" not in run.log and not run.second_up
    assert drivers(run, "after") == drivers(run, "before") == EXPECTED_DRIVERS, run.tail(120)
    assert_no_traceback(run)


def test_a_bridge_removed_mid_walk_is_reported_gone_and_the_handoff_goes_on(
    boot: Boot,
) -> None:
    """Row 3: a root port (and what is below it) hot-removed while the teardown runs."""
    run = boot(
        scenario(
            "setup-sriov 2 || exit 9\n"
            # The VFs' wave ends first; its lines arrive while the endpoints' wave (one at a
            # time) runs, long before the root ports' wave.
            f'{EXEC} --jobs 1 2>&1 | while IFS= read -r line; do echo "$line"; '
            'case "$line" in *"0000:01:00.1 unbind"*) '
            "echo 1 > /sys/bus/pci/devices/0000:00:0a.0/remove; echo REMOVED;; esac; done\n"
            "echo PK-EXIT $?\n"
        )
    )
    assert "REMOVED" in run.log, run.tail(120)
    assert re.search(r"0000:00:0a\.0 unbind +gone: function is gone", run.log), run.tail(120)
    readback = run.readback("pre-kexec")
    assert "0000:00:0a.0" not in readback and "0000:08:00.0" not in readback
    loud = {b: r.driver for b, r in readback.items() if r.driver is not None or r.bus_master}
    assert loud == {}, run.tail(120)
    assert run.second_up and run.second_devices.get("0000:08:00.0") == "ahci", run.tail(120)
    assert run.second_devices.get(NVME) == "nvme"
    assert_no_traceback(run)


def test_an_abandoned_unbind_that_returns_later_leaves_the_function_bindable(
    boot: Boot, tmp_path: Path
) -> None:
    """Row 32: virtio-9p's remove() waits for its mount (p9_virtio_remove()). The rollback's
    driver_override write waits on the device_lock that remove() holds and is reported as
    such; once the share is unmounted remove() returns, the override lands, and a manual bind
    works (with driver_override left "none" it failed with ENODEV)."""
    override = f"/sys/bus/pci/devices/{VIRTFS_BDF}/driver_override"
    run = boot(
        scenario(
            "mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt\n"
            f"{EXEC} --unprotect {VIRTFS_BDF} --unbind-timeout 3\necho PK-EXIT $?\n"
            "umount /mnt; echo UMOUNT-RC $?\n"
            f"n=0; while [ \"$(cat {override})\" != '(null)' ] && [ $n -lt 100 ]; do "
            "sleep 0.1; n=$((n + 1)); done\n"
            f"echo OVERRIDE-AFTER $(cat {override})\n"
            f"echo {VIRTFS_BDF} > /sys/bus/pci/drivers/virtio-pci/bind; echo BIND-RC $?\n"
            "readback after\n"
        ),
        virtfs_dir=tmp_path,
        poweroff_grace=5,
    )
    assert "PK-EXIT 5" in run.log, run.tail(120)
    assert re.search(
        rf"rollback: rebind {VIRTFS_BDF} to virtio-pci: remove\(\) \(child \d+\) still holds "
        r"device_lock: driver_override \(null\) is written when it returns",
        run.log,
    ), run.tail(120)
    assert "UMOUNT-RC 0" in run.log and "OVERRIDE-AFTER (null)" in run.log, run.tail(120)
    assert "BIND-RC 0" in run.log, run.tail(120)
    assert run.readback("after")[VIRTFS_BDF].driver == "virtio-pci"
    assert_no_traceback(run)
