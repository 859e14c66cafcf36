"""What the running system needs, read from mountinfo and a fake sysfs built under tmp_path."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.blockdev import functions_behind_block_device, resolve_link
from petitkexec.errors import PreflightRefused
from petitkexec.facts import Mount, gather_facts, read_kexec_loaded, read_lockdown, read_mounts

ROOT_PORT = "pci0000:00/0000:00:1c.0"
NVME_DISK = f"{ROOT_PORT}/0000:01:00.0/nvme/nvme0/nvme0n1"
SATA_DISK = "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"


# --- Mount.parse ------------------------------------------------------------------------------


def test_the_mountinfo_man_page_example_parses() -> None:
    mount = Mount.parse(
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
    )
    assert mount == Mount(
        device=(98, 0), mount_point="/mnt2", fstype="ext3", source="/dev/root", writable=True
    )


def test_a_line_without_optional_fields_parses() -> None:
    mount = Mount.parse("29 1 259:2 / / rw,relatime - ext4 /dev/nvme0n1p2 rw,errors=remount-ro")
    assert (mount.device, mount.mount_point, mount.fstype) == ((259, 2), "/", "ext4")
    assert mount.source == "/dev/nvme0n1p2"
    assert mount.writable


def test_several_optional_fields_are_skipped() -> None:
    mount = Mount.parse(
        "61 29 8:1 / /boot rw,relatime shared:33 master:2 propagate_from:4 unbindable"
        " - vfat /dev/sda1 rw,fmask=0022"
    )
    assert (mount.mount_point, mount.fstype, mount.source) == ("/boot", "vfat", "/dev/sda1")


def test_octal_escapes_in_mount_point_and_source_are_decoded() -> None:
    mount = Mount.parse(
        r"52 29 8:17 / /media/my\040disk\011tab\134back rw,nosuid shared:30"
        r" - vfat /dev/disk/by-label/MY\040DISK rw"
    )
    assert mount.mount_point == "/media/my disk\ttab\\back"
    assert mount.source == "/dev/disk/by-label/MY DISK"


def test_a_read_only_mount_is_not_writable() -> None:
    mount = Mount.parse("40 29 8:3 / /srv ro,relatime shared:9 - ext4 /dev/sda3 ro")
    assert not mount.writable


def test_a_rw_mount_of_a_file_system_whose_super_block_is_ro_is_not_writable() -> None:
    # e.g. an ext4 that hit errors=remount-ro: the mount flags still say rw.
    mount = Mount.parse("40 29 8:3 / /srv rw,relatime shared:9 - ext4 /dev/sda3 ro,errors=x")
    assert not mount.writable


def test_a_9p_mount_keeps_its_tag_as_source() -> None:
    mount = Mount.parse(
        "45 29 0:44 / /mnt/share rw,relatime shared:20 - 9p hostshare rw,access=client,trans=virtio"
    )
    assert (mount.device, mount.fstype, mount.source) == ((0, 44), "9p", "hostshare")


def test_every_line_of_this_machines_mountinfo_parses() -> None:
    lines = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.strip()]
    mounts = read_mounts(Path("/proc"))
    assert len(mounts) == len(lines)
    assert all(mount.mount_point.startswith("/") for mount in mounts)


# --- a fake sysfs and proc --------------------------------------------------------------------


class FakeMachine:
    """A sysfs + proc pair under tmp_path, laid out as the kernel lays them out."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        (self.proc / "self" / "mountinfo").write_text("")
        self.sys.mkdir()
        self.mountinfo: list[str] = []

    def directory(self, relative: str) -> Path:
        path = self.sys / "devices" / relative
        path.mkdir(parents=True, exist_ok=True)
        return path

    def link(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def block(self, relative: str, device: str, partition: bool = False) -> Path:
        """A block device directory and its /sys/dev/block/MAJ:MIN link."""
        path = self.directory(relative)
        (path / "dev").write_text(device + "\n")
        if partition:
            (path / "partition").write_text("1\n")
        self.link(self.sys / "dev" / "block" / device, path)
        return path

    def mount(self, line: str) -> None:
        self.mountinfo.append(line)
        (self.proc / "self" / "mountinfo").write_text("\n".join(self.mountinfo) + "\n")

    def needed(self, stat_file: Callable[[str], os.stat_result] = os.stat) -> dict[str, str]:
        """What gather_facts() protects on this machine, by function, with the reason."""
        facts = gather_facts(self.sys, self.proc, stat_file=stat_file)
        return {str(bdf): reason for bdf, reason in facts.needed.items()}


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


def test_the_root_disk_is_needed_because_it_backs_root(machine: FakeMachine) -> None:
    machine.block(NVME_DISK, "259:0")
    machine.mount("29 1 259:0 / / rw,relatime shared:1 - ext4 /dev/nvme0n1 rw")
    assert machine.needed() == {"0000:01:00.0": "backs / mounted rw"}


def test_a_partition_leads_to_the_disks_function(machine: FakeMachine) -> None:
    machine.block(NVME_DISK, "259:0")
    machine.block(f"{NVME_DISK}/nvme0n1p2", "259:2", partition=True)
    machine.mount("29 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw")
    assert machine.needed() == {"0000:01:00.0": "backs / mounted rw"}


def test_a_sata_partition_under_block_leads_to_the_ahci_function(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.block(f"{SATA_DISK}/sda1", "8:1", partition=True)
    machine.mount("30 29 8:1 / /var rw,relatime shared:2 - xfs /dev/sda1 rw")
    assert machine.needed() == {"0000:00:1f.2": "backs /var mounted rw"}


def test_device_mapper_is_followed_through_slaves_to_every_disk(machine: FakeMachine) -> None:
    nvme_partition = machine.block(f"{NVME_DISK}/nvme0n1p3", "259:3", partition=True)
    sata_partition = machine.block(f"{SATA_DISK}/sda2", "8:2", partition=True)
    dm = machine.block("virtual/block/dm-0", "253:0")
    machine.link(dm / "slaves" / "nvme0n1p3", nvme_partition)
    machine.link(dm / "slaves" / "sda2", sata_partition)
    machine.mount("29 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw")
    assert machine.needed() == {
        "0000:01:00.0": "backs / mounted rw",
        "0000:00:1f.2": "backs / mounted rw",
    }


def test_a_partition_of_an_nvme_multipath_head_leads_to_every_controller(
    machine: FakeMachine,
) -> None:
    paths = [
        machine.directory(f"{ROOT_PORT}/0000:01:00.0/nvme/nvme0/nvme0c0n1"),
        machine.directory("pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme1/nvme1c1n1"),
    ]
    head = machine.block("virtual/nvme-subsystem/nvme-subsys0/nvme0n1", "259:0")
    for path in paths:
        machine.link(head / "multipath" / path.name, path)
    machine.block("virtual/nvme-subsystem/nvme-subsys0/nvme0n1/nvme0n1p1", "259:1", partition=True)
    machine.mount("29 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw")
    assert machine.needed() == {
        "0000:01:00.0": "backs / mounted rw",
        "0000:3d:00.0": "backs / mounted rw",
    }


def test_an_nvme_multipath_head_without_a_multipath_directory_leads_to_the_subsystems_controllers(
    machine: FakeMachine,
) -> None:
    # Linux 6.1 (the guest's kernel): the head links to nvme-subsys0 only, and the subsystem
    # directory links to its controllers (nvme0 -> .../0000:01:00.0/nvme/nvme0).
    controller = machine.directory(f"{ROOT_PORT}/0000:01:00.0/nvme/nvme0")
    machine.block("virtual/nvme-subsystem/nvme-subsys0/nvme0n1", "259:1")
    machine.link(machine.sys / "devices/virtual/nvme-subsystem/nvme-subsys0/nvme0", controller)
    machine.mount("28 1 259:1 / /mnt/nvme rw,relatime - ext4 /dev/nvme0n1 rw")
    assert machine.needed() == {"0000:01:00.0": "backs /mnt/nvme mounted rw"}


def test_a_read_only_mount_other_than_root_is_not_needed(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.mount("40 29 8:0 / /srv ro,relatime shared:9 - ext4 /dev/sda ro")
    assert machine.needed() == {}


def test_a_root_mounted_read_only_is_still_needed(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.mount("29 1 8:0 / / ro,relatime shared:1 - ext4 /dev/sda ro")
    assert machine.needed() == {"0000:00:1f.2": "backs / mounted ro"}


def test_a_mount_on_a_virtual_block_device_needs_no_pci_function(machine: FakeMachine) -> None:
    machine.block("virtual/block/loop0", "7:0")
    machine.mount("29 1 7:0 / / rw,relatime shared:1 - squashfs /dev/loop0 rw")
    assert machine.needed() == {}


def test_a_mount_whose_device_sysfs_does_not_know_needs_nothing(machine: FakeMachine) -> None:
    machine.mount("29 1 8:0 / / rw,relatime shared:1 - ext4 /dev/sda rw")
    assert machine.needed() == {}


def virtio_9p(machine: FakeMachine, bdf: str, name: str, tag: str) -> None:
    device = machine.directory(f"pci0000:00/{bdf}/{name}")
    (device / "mount_tag").write_bytes(tag.encode() + b"\0\n")
    machine.link(machine.sys / "bus" / "virtio" / "devices" / name, device)


def test_a_mounted_9p_share_needs_its_virtio_function_naming_the_tag(
    machine: FakeMachine,
) -> None:
    virtio_9p(machine, "0000:00:04.0", "virtio2", "hostshare")
    virtio_9p(machine, "0000:00:05.0", "virtio3", "othershare")
    machine.mount("45 29 0:44 / /mnt/share rw,relatime shared:20 - 9p hostshare rw,trans=virtio")
    assert machine.needed() == {"0000:00:04.0": "9p share 'hostshare' mounted at /mnt/share"}


def test_a_read_only_9p_share_still_needs_its_virtio_function(machine: FakeMachine) -> None:
    # p9_virtio_remove() waits for every user of the channel, read-only mounts included:
    # unbinding the device behind any mounted share hangs (KERNEL-FACTS "Unbind").
    virtio_9p(machine, "0000:00:04.0", "virtio2", "hostshare")
    machine.mount("45 29 0:44 / /mnt/share ro,relatime shared:20 - 9p hostshare ro,trans=virtio")
    assert machine.needed() == {"0000:00:04.0": "9p share 'hostshare' mounted at /mnt/share"}


def test_a_9p_mount_with_an_unknown_tag_needs_nothing(machine: FakeMachine) -> None:
    virtio_9p(machine, "0000:00:04.0", "virtio2", "hostshare")
    machine.mount("45 29 0:44 / /mnt/x rw,relatime shared:20 - 9p elsewhere rw,trans=virtio")
    assert machine.needed() == {}


def test_a_virtio_device_without_a_readable_tag_is_skipped_not_the_ones_after_it(
    machine: FakeMachine,
) -> None:
    # Only virtio-9p devices have a mount_tag (virtio-net, virtio-blk have none), and a tag is
    # bytes the host chose: the devices are looked at in whatever order the directory lists
    # them, the share listed last here. Its tag is read whole, only the NUL and newline the
    # kernel appends dropped (mount_tag_show()).
    devices = machine.sys / "bus" / "virtio" / "devices"
    for number in range(4):
        directory = machine.directory(f"pci0000:00/0000:00:0{number + 3}.0/virtio{number}")
        machine.link(devices / f"virtio{number}", directory)
    *others, share = [entry.resolve() for entry in devices.iterdir()]
    (others[0] / "mount_tag").write_bytes(b"\xff\xfe\0\n")  # not UTF-8
    (share / "mount_tag").write_bytes(b"dataX\0\n")
    machine.mount("45 29 0:44 / /mnt/data rw,relatime shared:20 - 9p dataX rw,trans=virtio")
    assert machine.needed() == {share.parent.name: "9p share 'dataX' mounted at /mnt/data"}


def test_mounts_after_a_9p_share_and_a_read_only_mount_still_count(machine: FakeMachine) -> None:
    virtio_9p(machine, "0000:00:04.0", "virtio2", "hostshare")
    machine.block(SATA_DISK, "8:0")
    machine.block(NVME_DISK, "259:0")
    machine.mount("45 29 0:44 / /mnt/share rw,relatime shared:20 - 9p hostshare rw,trans=virtio")
    machine.mount("40 29 8:0 / /srv ro,relatime shared:9 - ext4 /dev/sda ro")
    machine.mount("41 29 259:0 / /var rw,relatime shared:10 - ext4 /dev/nvme0n1 rw")
    assert machine.needed() == {
        "0000:00:04.0": "9p share 'hostshare' mounted at /mnt/share",
        "0000:01:00.0": "backs /var mounted rw",
    }


def console(machine: FakeMachine, active: str) -> None:
    """/sys/class/tty/console/active: the consoles printk writes to (show_cons_active())."""
    (machine.sys / "class" / "tty" / "console").mkdir(parents=True)
    (machine.sys / "class" / "tty" / "console" / "active").write_text(active + "\n")


def test_a_serial_console_on_a_pci_card_is_needed(machine: FakeMachine) -> None:
    port = machine.directory("pci0000:00/0000:00:16.3/0000:00:16.3:0/0000:00:16.3:0.0")
    machine.link(machine.sys / "class" / "tty" / "ttyS4" / "device", port)
    (machine.sys / "class" / "tty" / "console").mkdir(parents=True)
    (machine.sys / "class" / "tty" / "console" / "active").write_text("tty0 ttyS4\n")
    assert machine.needed() == {"0000:00:16.3": "console ttyS4"}


def test_a_console_on_a_platform_uart_needs_nothing(machine: FakeMachine) -> None:
    port = machine.directory("platform/serial8250/serial8250:0/serial8250:0.0")
    machine.link(machine.sys / "class" / "tty" / "ttyS0" / "device", port)
    (machine.sys / "class" / "tty" / "console").mkdir(parents=True)
    (machine.sys / "class" / "tty" / "console" / "active").write_text("ttyS0\n")
    assert machine.needed() == {}


def test_a_virtual_terminal_console_needs_the_framebuffers_pci_function(
    machine: FakeMachine,
) -> None:
    gpu = machine.directory("pci0000:00/0000:00:02.0")
    machine.link(machine.sys / "class" / "graphics" / "fb0" / "device", gpu)
    (machine.sys / "class" / "tty" / "console").mkdir(parents=True)
    (machine.sys / "class" / "tty" / "console" / "active").write_text("tty0\n")
    assert machine.needed() == {"0000:00:02.0": "console tty0"}


def test_a_serial_console_is_not_taken_for_the_framebuffer_console(machine: FakeMachine) -> None:
    # Only ttyN (a virtual terminal) is drawn on fb0: ttyS0 on a platform UART needs nothing,
    # even with a PCI GPU behind fb0.
    port = machine.directory("platform/serial8250/serial8250:0/serial8250:0.0")
    machine.link(machine.sys / "class" / "tty" / "ttyS0" / "device", port)
    gpu = machine.directory("pci0000:00/0000:00:02.0")
    machine.link(machine.sys / "class" / "graphics" / "fb0" / "device", gpu)
    console(machine, "ttyS0")
    assert machine.needed() == {}


def test_every_active_console_is_needed(machine: FakeMachine) -> None:
    # console=tty0 console=ttyS4: printk writes to both.
    gpu = machine.directory("pci0000:00/0000:00:02.0")
    machine.link(machine.sys / "class" / "graphics" / "fb0" / "device", gpu)
    port = machine.directory("pci0000:00/0000:00:16.3/0000:00:16.3:0/0000:00:16.3:0.0")
    machine.link(machine.sys / "class" / "tty" / "ttyS4" / "device", port)
    console(machine, "tty0 ttyS4")
    assert machine.needed() == {"0000:00:02.0": "console tty0", "0000:00:16.3": "console ttyS4"}


def test_a_console_whose_device_is_gone_needs_nothing(machine: FakeMachine) -> None:
    # The card was removed between the read of `active` and the look at its link: a link
    # whose target is gone names no function, though its text still holds an address.
    link = machine.sys / "class" / "tty" / "ttyS4" / "device"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../../devices/pci0000:00/0000:00:16.3/0000:00:16.3:0/0000:00:16.3:0.0")
    console(machine, "ttyS4")
    assert machine.needed() == {}


def test_the_first_reason_for_a_function_wins(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.block(f"{SATA_DISK}/sda1", "8:1", partition=True)
    machine.block(f"{SATA_DISK}/sda2", "8:2", partition=True)
    machine.mount("29 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw")
    machine.mount("30 29 8:2 / /home rw,relatime shared:2 - ext4 /dev/sda2 rw")
    assert machine.needed() == {"0000:00:1f.2": "backs / mounted rw"}


def test_without_mountinfo_the_facts_are_refused_not_guessed(machine: FakeMachine) -> None:
    (machine.proc / "self" / "mountinfo").unlink()
    with pytest.raises(
        PreflightRefused, match="the disks the running system needs are unknown"
    ) as refused:
        gather_facts(machine.sys, machine.proc)
    assert refused.value.hint == f"mount -t proc proc {machine.proc}"


def test_a_mountinfo_line_that_does_not_parse_is_refused(machine: FakeMachine) -> None:
    machine.mount("22 1 garbage")
    with pytest.raises(PreflightRefused, match="not a mountinfo line"):
        gather_facts(machine.sys, machine.proc)


def test_without_lockdown_or_kexec_loaded_files_nothing_is_known(machine: FakeMachine) -> None:
    facts = gather_facts(machine.sys, machine.proc)
    assert facts.needed == {}
    assert facts.lockdown is None
    assert facts.kexec_loaded is None


# --- lockdown and kexec_loaded ----------------------------------------------------------------


def write_sysfs(root: Path, relative: str, text: str) -> None:
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "self" / "mountinfo").touch()
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("text", "level", "blocked"),
    [
        ("[none] integrity confidentiality\n", "none", False),
        ("none [integrity] confidentiality\n", "integrity", True),
        ("none integrity [confidentiality]\n", "confidentiality", True),
    ],
)
def test_the_lockdown_level_is_the_one_in_brackets(
    tmp_path: Path, text: str, level: str, blocked: bool
) -> None:
    write_sysfs(tmp_path, "kernel/security/lockdown", text)
    assert read_lockdown(tmp_path) == level
    facts = gather_facts(tmp_path, tmp_path / "proc")
    assert facts.lockdown == level
    assert facts.config_writes_blocked is blocked


def test_lockdown_is_unknown_when_not_exposed(tmp_path: Path) -> None:
    assert read_lockdown(tmp_path) is None


def test_lockdown_without_a_level_in_brackets_is_unknown(tmp_path: Path) -> None:
    # Not what lockdown_read() writes (the active level is always bracketed): unknown, not
    # a crash.
    write_sysfs(tmp_path, "kernel/security/lockdown", "none integrity confidentiality\n")
    assert read_lockdown(tmp_path) is None


@pytest.mark.parametrize(("text", "loaded"), [("1\n", True), ("0\n", False)])
def test_kexec_loaded_says_whether_an_image_is_loaded(
    tmp_path: Path, text: str, loaded: bool
) -> None:
    write_sysfs(tmp_path, "kernel/kexec_loaded", text)
    assert read_kexec_loaded(tmp_path) is loaded
    assert gather_facts(tmp_path, tmp_path / "proc").kexec_loaded is loaded


def test_kexec_loaded_is_unknown_when_not_exposed(tmp_path: Path) -> None:
    assert read_kexec_loaded(tmp_path) is None


@pytest.mark.parametrize("opal", [True, False])
def test_powernv_is_told_by_opal_firmware_in_sysfs(tmp_path: Path, opal: bool) -> None:
    # /sys/firmware/opal exists on OPAL (PowerNV) systems only (opal_init()).
    write_sysfs(tmp_path, "kernel/kexec_loaded", "0\n")
    if opal:
        (tmp_path / "firmware" / "opal").mkdir(parents=True)
    assert gather_facts(tmp_path, tmp_path / "proc").powernv is opal


def test_a_sysfs_link_resolves_with_readlink_as_realpath_does(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path)
    disk = machine.block("pci0000:00/0000:00:02.0/0000:01:00.0/nvme/nvme0/nvme0n1", "259:0")
    block = machine.sys / "dev" / "block"
    machine.link(block / "7:0", block / "259:0")  # a link to a link
    (block / "7:1").symlink_to("../../devices/gone")
    (block / "7:2").symlink_to("7:2")
    for path in (block / "259:0", block / "7:0", disk):
        assert resolve_link(path) == os.path.realpath(path, strict=True) == str(disk)
    with pytest.raises(FileNotFoundError):
        resolve_link(block / "7:1")  # its target is gone
    with pytest.raises(FileNotFoundError):
        resolve_link(block / "8:0")
    with pytest.raises(OSError) as raised:
        resolve_link(block / "7:2")  # a link to itself: the kernel's ELOOP, naming the path
    error = raised.value
    assert (error.errno, error.strerror, error.filename) == (
        errno.ELOOP,
        os.strerror(errno.ELOOP),
        str(block / "7:2"),
    )


def test_a_block_device_walk_goes_on_past_a_dead_link_a_device_seen_twice_and_a_loop(
    machine: FakeMachine,
) -> None:
    # Lower devices are walked last listed first: multipath/ entries before slaves/, so the
    # dead link and the second path to sda come while slaves/sdb is still waiting.
    sda = machine.block("pci0000:00/0000:00:1f.2/ata1/host0/block/sda", "8:0")
    sdb = machine.block("pci0000:00/0000:00:1c.0/0000:02:00.0/host1/block/sdb", "8:16")
    md = machine.block("virtual/block/md0", "9:0")
    machine.link(md / "slaves" / "sdb", sdb)
    machine.link(md / "multipath" / "a", sda)
    machine.link(md / "multipath" / "b", sda)
    (md / "multipath" / "c").symlink_to("../../gone")
    machine.link(md / "multipath" / "md0", md)  # a loop must not walk forever
    assert functions_behind_block_device(machine.sys, (9, 0)) == {
        Bdf.parse("0000:00:1f.2"),
        Bdf.parse("0000:02:00.0"),
    }


# --- in a chroot: the mount holding / is outside it ------------------------------------------


def stat_with_root(device: str) -> Callable[[str], os.stat_result]:
    """os.stat, but our root (/proc/self/root) lies on block device `device` (MAJ:MIN): a
    directory of a file system mounted outside the chroot."""
    major, minor = (int(number) for number in device.split(":"))

    def stat_file(path: str) -> os.stat_result:
        if path.endswith("/self/root"):
            directory = (stat.S_IFDIR | 0o755, 2, os.makedev(major, minor), 1, 0, 0, 0, 0, 0, 0)
            return os.stat_result(directory)
        return os.stat(path)

    return stat_file


def test_the_disk_holding_a_chroot_whose_mount_is_hidden_is_needed(machine: FakeMachine) -> None:
    # mmdebstrap's chroot: proc mounted inside, the ext4 holding it mounted outside, so
    # /proc/self/mountinfo has no `/` line (show_mountinfo() skips it).
    machine.block(NVME_DISK, "259:0")
    machine.block(f"{NVME_DISK}/nvme0n1p2", "259:2", partition=True)
    machine.mount("300 29 0:5 / /proc rw,nosuid - proc proc rw")
    assert machine.needed(stat_file=stat_with_root("259:2")) == {
        "0000:01:00.0": "backs / of this chroot (its mount lies outside it: not in our mount table)"
    }


def test_a_root_in_the_mount_table_is_not_looked_up_again(machine: FakeMachine) -> None:
    machine.block(NVME_DISK, "259:0")
    machine.mount("29 1 259:0 / / ro,relatime shared:1 - ext4 /dev/nvme0n1 ro")
    assert machine.needed(stat_file=stat_with_root("259:0")) == {
        "0000:01:00.0": "backs / mounted ro"
    }
