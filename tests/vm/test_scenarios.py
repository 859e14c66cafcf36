"""petitkexec in a real kernel: each test boots the q35 guest, runs one petitkexec command and
checks, from the guest's own read-back (busybox, not petitkexec's report) and from the second
kernel, what happened."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import EXPECTED_DRIVERS, VIRTFS_BDF, GuestRun
from tests.vm.images.disk import make_ext4_image

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]
EXEC = "petitkexec exec --kexec /usr/sbin/kexec-readback"
NVME = "0000:01:00.0"
NVME_PORT = "0000:00:02.0"
REPROBED = {"nvme", "e1000e", "e1000", "xhci_hcd", "virtio-pci", "ahci"}


def scenario(body: str) -> str:
    """Stamp the start of petitkexec so the handoff can be timed on the guest's clock."""
    return 'read -r up _ < /proc/uptime; echo "PK-START uptime=$up"\n' + body


def guest_uptime(run: GuestRun, word: str) -> float:
    match = re.search(rf"^{word} uptime=(\d+\.\d+)", run.log, re.M)
    assert match, f"no {word} line\n{run.tail()}"
    return float(match[1])


def exec_to_second_seconds(run: GuestRun) -> float:
    """PK-START → the second kernel's marker, on guest clocks (as the baseline measures)."""
    times = run.guest_times
    return times["starting_new_kernel"] - guest_uptime(run, "PK-START") + times["second_up"]


def state(run: GuestRun, tag: str) -> dict[str, tuple[str | None, int | None]]:
    """Each function's driver and COMMAND register, as the read-back with this tag saw them:
    what a rollback must bring back (a driver rebound with bus master or memory decoding off
    is not rolled back)."""
    return {bdf: (line.driver, line.command) for bdf, line in run.readback(tag).items()}


def assert_quiet_before_kexec(run: GuestRun, protected: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Right before the kexec syscall every unprotected function has no driver and BME off."""
    readback = run.readback("pre-kexec")
    assert set(readback) >= set(EXPECTED_DRIVERS) - protected, run.tail()
    loud = {
        bdf: (line.driver, line.command)
        for bdf, line in readback.items()
        if bdf not in protected and (line.driver is not None or line.bus_master)
    }
    assert loud == {}, run.tail(120)


def assert_second_kernel_reprobed(run: GuestRun) -> None:
    assert run.second_up, run.tail(120)
    assert run.second_devices == EXPECTED_DRIVERS | {
        bdf: driver for bdf, driver in run.second_devices.items() if bdf not in EXPECTED_DRIVERS
    }, run.tail()
    assert {d for d in run.second_devices.values() if d} >= REPROBED
    assert run.second_nvme and len(run.second_net) >= 5 and run.second_usb, run.tail()


def test_exec_tears_everything_down_and_the_second_kernel_reprobes(
    boot: Boot, record_timing: Callable[[str, str], None]
) -> None:
    run = boot(scenario(f"{EXEC}\necho PK-EXIT $?\n"))
    assert run.exit_code is None, run.tail(120)  # the scenario never came back: kexec happened
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)
    record_timing(
        "exec: petitkexec start -> second marker (guest clocks)",
        f"{exec_to_second_seconds(run):.2f}s",
    )
    record_timing(
        "exec: kexec start -> second marker (guest clocks)",
        f"{run.kexec_to_second_guest_seconds:.2f}s",
    )
    record_timing(
        "exec: petitkexec start -> kexec start (guest clocks)",
        f"{guest_uptime(run, 'KEXEC-START') - guest_uptime(run, 'PK-START'):.2f}s",
    )


def test_exec_unbinds_sriov_vfs_before_their_pf(boot: Boot) -> None:
    run = boot(scenario(f"setup-sriov 2 || exit 9\n{EXEC}\necho PK-EXIT $?\n"))
    assert "SRIOV-OK 2" in run.log, run.tail(120)
    steps = re.findall(r"^\[\s*\d+/\d+\] (0000:01:00\.\d) unbind +done", run.log, re.M)
    assert steps == ["0000:01:00.1", "0000:01:00.2", "0000:01:00.0"], run.tail(120)
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)


# The seven root ports and, below each, what their bus resets reach (the pcie-pci-bridge's
# own bus comes with 00:06.0's).
RESET_BRIDGES = {
    "0000:00:02.0": ("0000:01:00.0",),
    "0000:00:03.0": ("0000:02:00.0",),
    "0000:00:04.0": ("0000:03:00.0",),
    "0000:00:05.0": ("0000:04:00.0",),
    "0000:00:06.0": ("0000:05:00.0", "0000:06:01.0"),
    "0000:00:07.0": ("0000:07:00.0", "0000:07:00.1"),
    "0000:00:0a.0": ("0000:08:00.0",),
}


# What the kernel logs (pci_info) when, after the secondary bus reset, the link below a
# port does not report Data Link Layer Link Active within its wait
# (pci_bridge_wait_for_secondary_bus(), drivers/pci/pci.c): then reset_subordinate answers
# ENOTTY. On this guest the ports above QEMU's xHCI and AHCI reset without that wait, and the
# kernel logs nothing about them (seen, not traced to its cause).
KERNEL_NO_LINK = r"^\[\s*\d+\.\d+\] pci {bridge}: Data Link Layer Link Active not set in 1000 msec$"


def test_hot_reset_resets_the_root_ports_through_the_kernel(boot: Boot) -> None:
    # Console log level 7: the kernel's KERN_INFO lines about the resets reach the serial log.
    run = boot(scenario(f"echo 7 > /proc/sys/kernel/printk\n{EXEC} --hot-reset\necho PK-EXIT $?\n"))
    resets = {
        match[1]: match[0]
        for match in re.finditer(r"^\[\s*\d+/\d+\] (\S+) reset-bus .*$", run.log, re.M)
    }
    assert set(resets) == set(RESET_BRIDGES), run.tail(120)  # the root ports, side by side
    for line in resets.values():
        # Kernel-mediated, never raw. On QEMU 7.2's root ports the kernel resets the bus, then
        # gives up waiting for Data Link Layer Link Active and answers ENOTTY; the
        # pcie-pci-bridge's bus comes back. Either way every function below must answer.
        assert "reset_subordinate" in line and "functions answered" in line, line
        assert "raw" not in line
    # From outside petitkexec: the kernel's own account of every reset it refused ...
    refused = {bridge for bridge, line in resets.items() if "refused: ENOTTY" in line}
    kernel_says = {
        bridge
        for bridge in RESET_BRIDGES
        if re.search(KERNEL_NO_LINK.format(bridge=re.escape(bridge)), run.log, re.M)
    }
    assert kernel_says == refused, run.tail(150)
    # ... and busybox's read-back right before the kexec: every function below a reset bridge
    # is there, answers config reads (not 0xffff), has no driver and bus master off.
    readback = run.readback("pre-kexec")
    below = [bdf for functions in RESET_BRIDGES.values() for bdf in functions]
    answers = {bdf: readback[bdf].command for bdf in below if bdf in readback}
    assert set(answers) == set(below), run.tail(120)
    assert all(command not in (None, 0xFFFF) for command in answers.values()), answers
    assert not any(readback[bdf].driver or readback[bdf].bus_master for bdf in below), answers
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)


def test_integrity_lockdown_after_load_still_hands_off_and_reports_what_was_achieved(
    boot: Boot,
) -> None:
    run = boot(
        scenario(
            "echo integrity > /sys/kernel/security/lockdown\n"
            "cat /sys/kernel/security/lockdown | sed 's/^/LOCKDOWN-NOW /'\n"
            f"{EXEC}\necho PK-EXIT $?\n"
        )
    )
    assert "LOCKDOWN-NOW none [integrity] confidentiality" in run.log, run.tail()
    assert "through enable (config writes blocked: EPERM; count" in run.log, run.tail(120)
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)


def test_a_mounted_ext4_on_nvme_is_protected_and_its_fresh_data_survives(
    boot: Boot, tmp_path: Path
) -> None:
    disk = make_ext4_image(tmp_path / "nvme.img", {"hello.txt": "from the host\n"})
    run = boot(
        scenario(
            "mkdir -p /mnt/nvme && mount -t ext4 /dev/nvme0n1 /mnt/nvme\n"
            # Written and not synced: the page cache holds it when petitkexec starts.
            "echo fresh-$MARKER > /mnt/nvme/fresh.txt\n"
            f"{EXEC}\necho PK-EXIT $?\n"
        ),
        nvme_image=disk,
        second_scenario=(
            "mkdir -p /mnt/nvme && mount -t ext4 -o ro /dev/nvme0n1 /mnt/nvme || exit 1\n"
            "sed 's/^/NVME-FILE /' /mnt/nvme/fresh.txt\n"
            "umount /mnt/nvme && echo NVME-UNMOUNTED\n"
        ),
    )
    assert re.search(rf"{NVME} protect +held: backs /mnt/nvme mounted rw", run.log), run.tail(120)
    assert re.search(rf"{NVME_PORT} protect +held: above protected {NVME}", run.log)
    readback = run.readback("pre-kexec")
    assert readback[NVME].driver == "nvme"
    assert_quiet_before_kexec(run, protected={NVME, NVME_PORT})
    assert f"NVME-FILE fresh-{run.marker}" in run.log, run.tail(120)
    assert "NVME-UNMOUNTED" in run.log
    # Nothing lost: the guests are gone; the file system they wrote is clean and holds the data.
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /fresh.txt", str(disk)], capture_output=True, text=True
    )
    assert cat.stdout == f"fresh-{run.marker}\n", cat.stderr


def test_a_mounted_9p_share_is_protected_by_default(boot: Boot, tmp_path: Path) -> None:
    run = boot(
        scenario(
            f"mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt\n{EXEC}\necho PK-EXIT $?\n"
        ),
        virtfs_dir=tmp_path,
    )
    assert re.search(rf"{VIRTFS_BDF} protect +held: 9p share 'host0' mounted at /mnt", run.log), (
        run.tail(120)
    )
    assert_quiet_before_kexec(run, protected={VIRTFS_BDF})
    assert run.second_up, run.tail(120)


def test_a_hung_remove_hits_the_deadline_and_there_is_no_handoff(
    boot: Boot, tmp_path: Path
) -> None:
    run = boot(
        scenario(
            "mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt\n"
            "readback before\n"
            f"{EXEC} --unprotect {VIRTFS_BDF} --unbind-timeout 3\necho PK-EXIT $?\n"
            "readback after\n"
        ),
        virtfs_dir=tmp_path,
        poweroff_grace=5,
    )
    assert "PK-EXIT 5" in run.log, run.tail(120)
    assert re.search(
        rf"{VIRTFS_BDF} unbind +hung: virtio-pci remove\(\) did not return within 3 s", run.log
    ), run.tail(120)
    stopped = "stopped: unbind of 0000:00:09.0: virtio-pci remove() did not return within 3 s"
    assert stopped in run.log
    assert "KEXEC-START" not in run.log and not run.second_up
    # Everything else was rolled back: drivers and COMMAND as before. The stuck function
    # reads unbound: the kernel drops the driver link before it calls remove().
    before, after = state(run, "before"), state(run, "after")
    assert after.pop(VIRTFS_BDF)[0] is None and before.pop(VIRTFS_BDF)[0] == "virtio-pci"
    assert after == before, run.tail(120)


def test_dry_run_changes_nothing(boot: Boot) -> None:
    run = boot(scenario(f"readback before\n{EXEC} --dry-run\necho PK-EXIT $?\nreadback after\n"))
    assert "PK-EXIT 0" in run.log, run.tail(120)
    assert run.readback("before") == {
        bdf: line.__class__(line.bdf, line.driver, line.command, "before")
        for bdf, line in run.readback("after").items()
    }
    assert "dry run: would now run /usr/sbin/kexec-readback -e" in run.log
    assert not run.second_up


def test_without_a_loaded_kernel_preflight_refuses_and_touches_nothing(boot: Boot) -> None:
    run = boot(
        scenario(f"readback before\n{EXEC}\necho PK-EXIT $?\nreadback after\n"),
        load_second=False,
    )
    assert "PK-EXIT 3" in run.log, run.tail(120)
    assert "petitkexec: no kernel is loaded for kexec" in run.log
    before, after = run.readback("before"), run.readback("after")
    assert {bdf: (line.driver, line.command) for bdf, line in before.items()} == {
        bdf: (line.driver, line.command) for bdf, line in after.items()
    }


def test_exec_load_loads_the_kernel_itself_and_syscall_hands_off_without_kexec_e(
    boot: Boot,
) -> None:
    run = boot(
        scenario(
            "petitkexec exec --syscall --load /boot/vmlinuz --initrd /boot/second.cpio.gz "
            '--append "$SECOND_CMDLINE"\necho PK-EXIT $?\n'
        ),
        load_second=False,
    )
    assert "handing off: reboot(LINUX_REBOOT_CMD_KEXEC)" in run.log, run.tail(120)
    assert_second_kernel_reprobed(run)


def test_a_failed_handoff_rolls_every_driver_back(boot: Boot) -> None:
    run = boot(
        scenario(
            "readback before\npetitkexec exec --kexec /bin/false\necho PK-EXIT $?\nreadback after\n"
        )
    )
    assert "PK-EXIT 4" in run.log, run.tail(120)
    assert "handoff failed: /bin/false -e returned 1" in run.log
    # The kexec-readback's pre-kexec read-back is not taken (/bin/false is the binary): the
    # teardown is proven by petitkexec's lines; the rollback by busybox's, COMMAND included.
    after = state(run, "after")
    assert {bdf: driver for bdf, (driver, _) in after.items()} == EXPECTED_DRIVERS, run.tail(120)
    assert after == state(run, "before"), run.tail(120)
    rollback = [line for line in run.log.splitlines() if line.startswith("rollback: ")]
    assert rollback and all(line.endswith(": ok") for line in rollback), run.tail(120)
