"""What is in use, on the real kernel in the q35 guest: a namespace a process holds open for
writing, a device a vfio user holds, and the watchdog --watchdog arms for a next kernel that
hangs. The read-backs are busybox's (tests/vm/guest/readback), not petitkexec's report."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import guest
from tests.vm.guest import GuestRun
from tests.vm.images.build import Images
from tests.vm.test_scenarios import (
    EXEC,
    NVME,
    NVME_PORT,
    assert_quiet_before_kexec,
    assert_second_kernel_reprobed,
    scenario,
)

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]

E1000 = "0000:06:01.0"  # behind the pcie-pci-bridge
PCI_BRIDGE = "0000:05:00.0"
E1000_PORT = "0000:00:06.0"
ESB = "0000:00:0b.0"  # the i6300esb the watchdog tests add
ESB_DEVICE = ("-device", "i6300esb,bus=pcie.0,addr=0xb")
ESB_DRIVER = "i6300ESB timer"  # the PCI driver's name (drivers/watchdog/i6300esb.c)

# Debian's 6.1 kernel is built without CONFIG_VFIO_NOIOMMU (no vfio.enable_unsafe_noiommu_mode,
# and vfio-pci's probe fails without an IOMMU group): the vfio test gets QEMU's intel-iommu.
# It goes first: QEMU gives each PCI device its DMA address space when the device is
# realized, so devices created before the IOMMU would bypass it. Without interrupt remapping
# (intremap=off) vfio_iommu_type1 refuses VFIO_SET_IOMMU unless allow_unsafe_interrupts.
Q35_IOMMU = dataclasses.replace(
    guest.Q35, topology=("-device intel-iommu,intremap=off", *guest.TOPOLOGY)
)
IOMMU_APPEND = "intel_iommu=on iommu=pt vfio_iommu_type1.allow_unsafe_interrupts=1"

# A vfio user that keeps the device open: container + group + device file descriptor, the
# way QEMU or DPDK hold it. Holding only the group's node would not make vfio-pci's remove()
# wait: vfio_unregister_group_dev() waits for the *device's* users.
VFIO_HOLDER = """\
import fcntl, os, struct, sys, time

def vfio_ioctl(number):  # _IO(VFIO_TYPE, VFIO_BASE + n), include/uapi/linux/vfio.h
    return (ord(";") << 8) | (100 + number)

bdf = sys.argv[1]
group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
container = os.open("/dev/vfio/vfio", os.O_RDWR)
group_fd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
fcntl.ioctl(group_fd, vfio_ioctl(4), struct.pack("i", container))  # GROUP_SET_CONTAINER
fcntl.ioctl(container, vfio_ioctl(2), 3)  # SET_IOMMU VFIO_TYPE1v2_IOMMU
device_fd = fcntl.ioctl(group_fd, vfio_ioctl(6), bytearray(bdf.encode() + b"\\0"))
print(f"VFIO-HELD node=/dev/vfio/{group} device_fd={device_fd} pid={os.getpid()}", flush=True)
time.sleep(100000)
"""


@pytest.fixture
def boot_with_iommu(vm_images: Images, timed_boot: Callable[[Boot, Images], Boot]) -> Boot:
    """boot(scenario, **kwargs) -> GuestRun on the q35 guest with intel-iommu."""
    return timed_boot(functools.partial(guest.boot, Q35_IOMMU), vm_images)


def holder_pid(run: GuestRun, word: str) -> int:
    match = re.search(rf"^{word} .*\bpid=(\d+)", run.log, re.M)
    assert match, f"no {word} line\n{run.tail(120)}"
    return int(match[1])


def test_a_namespace_open_for_writing_is_protected_and_the_rest_torn_down(boot: Boot) -> None:
    """Not mounted, only open: `3<>` opens O_RDWR, what a database on a raw device does."""
    run = boot(
        scenario(
            "sleep 600 3<>/dev/nvme0n1 &\n"
            'echo "HOLDER pid=$!"\n'
            # The background child opens fd 3 after the fork: wait until it has.
            "n=0; while [ ! -e /proc/$!/fdinfo/3 ] && [ $n -lt 100 ]; do\n"
            "sleep 0.1; n=$((n + 1)); done\n"
            "grep flags /proc/$!/fdinfo/3 | sed 's/^/HOLDER-FD /'\n"
            f"{EXEC}\necho PK-EXIT $?\n"
        )
    )
    pid = holder_pid(run, "HOLDER")
    flags = re.search(r"^HOLDER-FD flags:\s+([0-7]+)$", run.log, re.M)
    assert flags and int(flags[1], 8) & 0o3 == 0o2, run.tail(120)  # O_RDWR
    assert re.search(rf"{NVME} protect +held: in use: /dev/nvme0n1 by pid {pid} sleep", run.log), (
        run.tail(120)
    )
    assert re.search(rf"{NVME_PORT} protect +held: above protected {NVME}", run.log)
    readback = run.readback("pre-kexec")
    assert readback[NVME].driver == "nvme" and readback[NVME].bus_master, run.tail(120)
    assert readback[NVME_PORT].driver == "pcieport"
    assert_quiet_before_kexec(run, protected={NVME, NVME_PORT})
    assert_second_kernel_reprobed(run)


def test_a_device_held_through_vfio_is_protected_and_forced_its_unbind_hangs_without_handoff(
    boot_with_iommu: Boot,
) -> None:
    run = boot_with_iommu(
        scenario(
            f"echo {E1000} > /sys/bus/pci/devices/{E1000}/driver/unbind\n"
            f"echo vfio-pci > /sys/bus/pci/devices/{E1000}/driver_override\n"
            f"echo {E1000} > /sys/bus/pci/drivers/vfio-pci/bind || exit 9\n"
            f"python3 /vfio_holder.py {E1000} > /tmp/holder 2>&1 &\nholder=$!\n"
            "n=0; while ! grep -q VFIO-HELD /tmp/holder && [ $n -lt 600 ]; do "
            "sleep 0.1; n=$((n + 1)); done\ncat /tmp/holder\n"
            "petitkexec plan\necho PLAN-EXIT $?\n"
            f"{EXEC} --unprotect {E1000} --unbind-timeout 3\necho PK-EXIT $?\n"
            "readback after\n"
            # Let go: vfio-pci's remove() returns, the unbind left behind finishes, and the
            # kernel's own shutdown (poweroff) no longer waits on the device lock.
            "kill $holder; wait $holder; echo HOLDER-EXIT $?\n"
        ),
        kernel_append=IOMMU_APPEND,
        extra_files={"vfio_holder.py": VFIO_HOLDER.encode()},
        poweroff_grace=10,
    )
    held = re.search(r"^VFIO-HELD node=(/dev/vfio/\d+) device_fd=\d+ pid=(\d+)", run.log, re.M)
    assert held, run.tail(120)
    node, pid = held[1], held[2]
    # (a) The plan: the function and everything above it are left alone.
    assert "PLAN-EXIT 0" in run.log, run.tail(120)
    assert re.search(rf"{E1000} .*→  protect \(in use: {node} by pid {pid} python3\)", run.log)
    for bridge in (PCI_BRIDGE, E1000_PORT):
        assert re.search(rf"{bridge} .*→  protect \(", run.log), run.tail(120)
    # (b) Forced: vfio-pci's remove() waits for the user, the deadline fires, no handoff.
    assert "PK-EXIT 5" in run.log, run.tail(120)
    assert re.search(
        rf"{E1000} unbind +hung: vfio-pci remove\(\) did not return within 3 s", run.log
    ), run.tail(120)
    assert f"stopped: unbind of {E1000}: vfio-pci remove() did not return within 3 s" in run.log
    assert re.search(rf"vfio-pci {E1000}: .*blocked until", run.log), run.tail(120)
    assert "KEXEC-START" not in run.log and not run.second_up
    for bridge in (PCI_BRIDGE, E1000_PORT):  # still protected: never touched
        assert not re.search(rf"{bridge} (unbind|clear-bus-master) ", run.log), run.tail(120)
    after = run.readback("after")  # everything else was rolled back: drivers are bound again
    assert after[NVME].driver == "nvme" and after[E1000_PORT].driver == "pcieport", run.tail(120)
    # The kernel drops the driver link before it calls remove() (__device_release_driver()):
    # the stuck function reads as unbound already; only the kernel log says remove() waits.
    assert after[E1000].driver is None
    # Once the user let go (SIGTERM: 143), remove() returned: poweroff's device_shutdown()
    # got the device lock.
    assert "HOLDER-EXIT 143" in run.log, run.tail(120)
    assert "reboot: Power down" in run.log and not run.poweroff_hung, run.tail(120)


class QmpEvents(threading.Thread):
    """QEMU's own account of the run: the events of its QMP monitor on a unix socket
    (WATCHDOG when a watchdog device fires, SHUTDOWN with its reason), each with the
    host's monotonic time of arrival."""

    def __init__(self, path: Path, connect_timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.path, self.connect_timeout = path, connect_timeout
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.connected_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
            while True:  # QEMU creates the socket when it starts, after boot() built the initrd
                try:
                    qmp.connect(str(self.path))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
            self.connected_at = time.monotonic()
            stream = qmp.makefile("rwb")
            stream.readline()  # the greeting; events come after capability negotiation
            stream.write(b'{"execute": "qmp_capabilities"}\n')
            stream.flush()
            for line in stream:
                message = json.loads(line)
                if "event" in message:
                    self.events.append((time.monotonic(), message))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [message for _, message in self.events if message["event"] == name]


@pytest.fixture
def qmp_socket() -> Iterator[Path]:
    """A short path for QMP's unix socket (sun_path holds 108 bytes; tmp_path can be longer)."""
    directory = Path(tempfile.mkdtemp(prefix="pk-qmp-"))
    yield directory / "qmp.sock"
    shutil.rmtree(directory, ignore_errors=True)


def test_watchdog_resets_the_machine_when_the_next_kernel_hangs(
    boot: Boot, qmp_socket: Path, record_timing: Callable[[str, str], None]
) -> None:
    events = QmpEvents(qmp_socket)
    events.start()
    run = boot(
        scenario(
            "sed 's/^/STOP-ON-REBOOT /' /sys/module/watchdog/parameters/stop_on_reboot\n"
            f"{EXEC} --watchdog 20\necho PK-EXIT $?\n"
        ),
        extra_qemu_args=[*ESB_DEVICE, "-qmp", f"unix:{qmp_socket},server=on,wait=off"],
        # watchdog.stop_on_reboot=0: i6300esb's watchdog_stop_on_reboot() would stop it at
        # the kexec. The second kernel's init is a sleep: it hangs before it loads any module
        # (no driver touches the watchdog); loglevel=7 shows that its init did start.
        kernel_append="watchdog.stop_on_reboot=0",
        second_append="loglevel=7 rdinit=/bin/sleep -- 100000",
        timeout=300,
    )
    events.join(timeout=10)
    assert "STOP-ON-REBOOT 0" in run.log, run.tail(120)
    assert re.search(
        rf"{ESB} protect +held: watchdog0 armed for the handoff by --watchdog", run.log
    ), run.tail(120)
    readback = run.readback("pre-kexec")
    assert readback[ESB].driver == ESB_DRIVER, run.tail(120)
    assert_quiet_before_kexec(run, protected={ESB})
    # The next kernel started its init, which hangs: no marker, no device probed.
    assert "kexec_core: Starting new kernel" in run.log, run.tail(120)
    assert "Run /bin/sleep as init process" in run.log, run.tail(120)
    assert not run.second_up
    # QEMU says the watchdog fired and reset the machine (-no-reboot: a reset ends QEMU).
    assert [event["data"] for event in events.named("WATCHDOG")] == [{"action": "reset"}], (
        events.events
    )
    assert events.named("SHUTDOWN")[-1]["data"] == {"guest": True, "reason": "guest-reset"}
    assert not run.timed_out and run.qemu_returncode == 0, run.tail()
    fired = next(at for at, message in events.events if message["event"] == "WATCHDOG")
    assert events.connected_at is not None
    record_timing(
        "watchdog: KEXEC-START -> WATCHDOG event (host, ~0.1 s)",
        f"{fired - events.connected_at - run.host_times['KEXEC-START']:.1f}s",
    )


def test_watchdog_is_refused_when_the_running_kernel_would_stop_it(boot: Boot) -> None:
    run = boot(
        scenario(
            "sed 's/^/STOP-ON-REBOOT /' /sys/module/watchdog/parameters/stop_on_reboot\n"
            f"readback before\n{EXEC} --watchdog 30\necho PK-EXIT $?\nreadback after\n"
        ),
        extra_qemu_args=list(ESB_DEVICE),
    )
    assert "STOP-ON-REBOOT -1" in run.log, run.tail(120)
    assert "PK-EXIT 3" in run.log, run.tail(120)
    assert (
        "petitkexec: --watchdog: the running kernel would stop watchdog0 before the next kernel "
        f"runs: {ESB_DRIVER} stops it on reboot (watchdog_stop_on_reboot(); boot with "
        "watchdog.stop_on_reboot=0)"
    ) in run.log, run.tail(120)
    before, after = run.readback("before"), run.readback("after")
    assert before[ESB].driver == ESB_DRIVER
    assert {bdf: (line.driver, line.command) for bdf, line in after.items()} == {
        bdf: (line.driver, line.command) for bdf, line in before.items()
    }
    assert "KEXEC-START" not in run.log and not run.second_up
