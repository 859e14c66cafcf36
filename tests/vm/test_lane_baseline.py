"""The lane itself, without petitkexec's teardown: a plain `kexec -e` reaches a second kernel
that re-probes every device, pyudev sees the guest's PCI functions (through petitkexec's
libudev loader: the image has no ldconfig), nvme SR-IOV VFs come up, and a guest that never
finishes is killed on time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.guest import EXPECTED_DRIVERS, VIRTFS_BDF, GuestRun, boot_guest
from tests.vm.images.build import Images
from tests.vm.images.disk import make_ext4_image

pytestmark = pytest.mark.vm

NVME_FILE_TEXT = "written on the host, read by the second kernel"
BASELINE_SCENARIO = r"""
python3 - <<'EOF'
import click, structlog, pyudev
try:  # no ldconfig in the image: pyudev's own lookup fails, as in firmware images
    pyudev.Context()
except ImportError as error:
    print("PYUDEV-PLAIN", error)
from petitkexec.discovery import udev_context  # loads libudev by its soname
for device in udev_context().list_devices(subsystem="pci"):
    print("PYUDEV-PCI", device.sys_name, device.driver or "-")
EOF
echo "PYUDEV-EXIT $?"
/usr/sbin/kexec-readback -e
echo "KEXEC-RETURNED $?"
"""
SECOND_SCENARIO = r"""
mkdir -p /mnt/nvme
mount -t ext4 -o ro /dev/nvme0n1 /mnt/nvme || exit 1
sed 's/^/NVME-FILE /' /mnt/nvme/hello.txt
umount /mnt/nvme
"""
# Drivers the second kernel must bind again after the kexec.
REPROBED = {"nvme", "e1000e", "e1000", "xhci_hcd", "virtio-pci", "ahci"}


@pytest.fixture(scope="module")
def baseline(
    vm_images: Images,
    tmp_path_factory: pytest.TempPathFactory,
    record_timing: Callable[[str, str], None],
) -> GuestRun:
    disk = make_ext4_image(
        tmp_path_factory.mktemp("nvme") / "nvme.img", {"hello.txt": NVME_FILE_TEXT + "\n"}
    )
    run = boot_guest(
        BASELINE_SCENARIO, second_scenario=SECOND_SCENARIO, nvme_image=disk, images=vm_images
    )

    def seconds(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}s"

    record_timing("baseline round trip wall", seconds(run.wall_seconds))
    record_timing(
        "baseline kexec start -> second marker (guest clocks, excludes purgatory+decompression)",
        seconds(run.kexec_to_second_guest_seconds),
    )
    record_timing(
        "baseline kexec start -> second marker (host arrival of the lines)",
        seconds(run.kexec_to_second_host_seconds),
    )
    print(f"guest times {run.guest_times}\nhost times {run.host_times}")
    return run


def test_plain_kexec_reaches_the_second_kernel(baseline: GuestRun) -> None:
    assert not baseline.timed_out, baseline.tail()
    assert baseline.second_up, baseline.tail()
    assert baseline.exit_code is None, "the scenario returned: kexec -e did not happen"
    assert baseline.second_done, baseline.tail()
    assert baseline.kexec_to_second_guest_seconds is not None, baseline.guest_times
    assert 0 < baseline.kexec_to_second_guest_seconds < 60
    assert 0 < baseline.kexec_to_second_host_seconds < 120  # type: ignore[operator]


def test_second_kernel_reprobes_every_driver(baseline: GuestRun) -> None:
    assert baseline.second_devices == EXPECTED_DRIVERS, baseline.tail()
    assert {d for d in baseline.second_devices.values() if d} >= REPROBED
    assert baseline.second_nvme, "no nvme namespace after the kexec"
    assert len(baseline.second_net) >= 5  # lo + four NICs
    assert baseline.second_usb, "no USB bus after the kexec"


def test_second_kernel_reads_the_nvme_file_system(baseline: GuestRun) -> None:
    assert baseline.second_scenario_exit == 0, baseline.tail()
    assert f"NVME-FILE {NVME_FILE_TEXT}" in baseline.log.splitlines()


def test_readback_before_kexec_shows_the_bound_devices_mastering(baseline: GuestRun) -> None:
    before = baseline.readback("pre-kexec")
    assert {bdf: line.driver for bdf, line in before.items()} == EXPECTED_DRIVERS
    for bdf, line in before.items():
        if line.driver is not None or bdf == "0000:05:00.0":
            # Bound devices master; so does the driverless pcie-pci-bridge (QEMU/firmware).
            assert line.bus_master, f"{bdf}: COMMAND={line.command:#06x}"
        else:
            assert line.bus_master is False, f"{bdf}: COMMAND={line.command:#06x}"
    assert before["0000:00:02.0"].command == 0x0507  # pcieport: IO, MEM, BME, SERR
    # The second kernel's drivers turn bus mastering on again.
    after = baseline.readback("second")
    assert all(after[bdf].bus_master for bdf, drv in EXPECTED_DRIVERS.items() if drv)


def test_pyudev_lists_the_guest_pci_functions(baseline: GuestRun) -> None:
    assert "PYUDEV-EXIT 0" in baseline.log.splitlines(), baseline.tail()
    # Without ldconfig, ctypes.util.find_library finds nothing (pyudev #83, #532) ...
    assert "PYUDEV-PLAIN No library named udev" in baseline.log.splitlines()
    # ... and libudev loaded by its soname lists every function.
    listed = {}
    for line in baseline.lines_starting("PYUDEV-PCI "):
        _, bdf, driver = line.split()
        listed[bdf] = None if driver == "-" else driver
    assert listed == EXPECTED_DRIVERS


def test_nvme_sriov_vfs_come_up_and_are_gone_after_kexec(boot) -> None:  # type: ignore[no-untyped-def]
    run: GuestRun = boot(
        "setup-sriov\necho SETUP-EXIT $?\nreadback sriov\n/usr/sbin/kexec-readback -e\n"
    )
    assert "SETUP-EXIT 0" in run.log.splitlines(), run.tail(120)
    assert run.lines_starting("SRIOV-VF ") == [
        "SRIOV-VF 0000:01:00.1 driver=nvme",
        "SRIOV-VF 0000:01:00.2 driver=nvme",
    ]
    vfs = {
        bdf: line
        for bdf, line in run.readback("pre-kexec").items()
        if bdf in ("0000:01:00.1", "0000:01:00.2")
    }
    assert {line.driver for line in vfs.values()} == {"nvme"}
    assert run.second_up, run.tail()
    # VFs do not survive a kexec: the next kernel finds the PF with SR-IOV disabled.
    assert "0000:01:00.1" not in run.second_devices
    assert run.second_devices["0000:01:00.0"] == "nvme"


def test_a_guest_that_never_finishes_is_killed_on_time(boot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = tmp_path / "share"
    shared.mkdir()
    (shared / "from-host.txt").write_text("host side\n")
    scenario = """
mkdir -p /mnt/host
mount -t 9p -o trans=virtio,version=9p2000.L "$PK_VIRTFS_TAG" /mnt/host || exit 1
sed 's/^/VIRTFS-READ /' /mnt/host/from-host.txt
readback virtfs
echo "guest side" > /mnt/host/from-guest.txt
sync
echo HANGING-NOW
sleep 100000
"""
    run: GuestRun = boot(scenario, virtfs_dir=shared, load_second=False, timeout=30)
    assert run.timed_out, run.tail()
    assert run.wall_seconds < 45
    assert "HANGING-NOW" in run.log.splitlines(), run.tail()
    assert "VIRTFS-READ host side" in run.log.splitlines()
    assert run.readback("virtfs")[VIRTFS_BDF].driver == "virtio-pci"
    assert (shared / "from-guest.txt").read_text() == "guest side\n"
