"""Pooled and stacked storage: each one's real disks found from what the kernel exposes, on a
fake sysfs and /proc (tests/test_facts.py's FakeMachine) and files under tmp_path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from petitkexec.facts import needed_functions, read_mounts
from petitkexec.inuse import scan_busy
from petitkexec.mounts import Mount, overlay_directories
from petitkexec.storage import Storage
from tests.test_facts import NVME_DISK, SATA_DISK, FakeMachine
from tests.test_inuse import process
from tests.test_netstorage import NetMachine

NVME = "0000:01:00.0"
AHCI = "0000:00:1f.2"


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


def put_on_nvme(machine: FakeMachine, path: Path) -> None:
    """Make the file system holding `path` (tmp_path's, a real one) look like the fake NVMe
    disk: its st_dev links to the disk, or, when anonymous (0:x), a mount of that st_dev whose
    source is a block node of the disk."""
    device = os.stat(path).st_dev
    number = f"{os.major(device)}:{os.minor(device)}"
    if os.major(device) != 0:
        machine.block(NVME_DISK, number)
        return
    machine.block(NVME_DISK, "259:0")
    node = machine.sys.parent / "nvme0n1"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(259, 0))
    machine.mount(f"90 1 {number} / {path} rw,relatime - ext4 {node} rw")


def block_node(machine: FakeMachine, name: str, number: str) -> Path:
    major, minor = number.split(":")
    node = machine.sys.parent / name
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(int(major), int(minor)))
    return node


def test_a_loop_device_mounted_rw_needs_the_disk_holding_its_backing_file(
    machine: FakeMachine, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 512)
    put_on_nvme(machine, image)
    loop = machine.block("virtual/block/loop0", "7:0")
    (loop / "loop").mkdir()
    (loop / "loop" / "backing_file").write_text(f"{image}\n")
    machine.mount("40 29 7:0 / /mnt/img rw,relatime - ext4 /dev/loop0 rw")
    assert machine.needed() == {NVME: f"loop0 on {image}, backs /mnt/img mounted rw"}


def test_a_swap_file_needs_the_disk_of_its_file_system(
    machine: FakeMachine, tmp_path: Path
) -> None:
    swapfile = tmp_path / "swapfile"
    swapfile.write_bytes(b"")
    put_on_nvme(machine, swapfile)
    (machine.proc / "swaps").write_text(
        "Filename\tType\tSize\tUsed\tPriority\n"
        f"{swapfile}                               file\t\t1048572\t0\t-2\n"
    )
    assert machine.needed() == {NVME: f"backs active swap {swapfile}"}


def test_zram_with_a_backing_device_needs_that_devices_disk(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.block(f"{SATA_DISK}/sda2", "8:2", partition=True)
    node = block_node(machine, "sda2", "8:2")
    zram = machine.block("virtual/block/zram0", "252:0")
    (zram / "backing_dev").write_text(f"{node}\n")
    # The swap's device number comes from stat() of the node /proc/swaps names: our own.
    zram_node = block_node(machine, "zram0", "252:0")
    (machine.proc / "swaps").write_text(
        f"Filename\tType\tSize\tUsed\tPriority\n{zram_node} partition\t4194300\t0\t100\n"
    )
    assert machine.needed() == {AHCI: f"zram0 writes back to {node}, backs active swap {zram_node}"}


def test_zram_without_a_backing_device_needs_nothing(machine: FakeMachine) -> None:
    zram = machine.block("virtual/block/zram0", "252:0")
    (zram / "backing_dev").write_text("none\n")
    machine.mount("40 29 252:0 / /tmp rw,relatime - ext4 /dev/zram0 rw")
    assert machine.needed() == {}


def test_bcache_needs_its_backing_disk_and_its_caching_device(machine: FakeMachine) -> None:
    backing = machine.block(f"{SATA_DISK}", "8:0")
    caching = machine.block(NVME_DISK, "259:0")
    (caching / "bcache").mkdir()
    bcache = machine.block("virtual/block/bcache0", "250:0")
    machine.link(bcache / "slaves" / "sda", backing)
    cache_set = machine.sys / "fs" / "bcache" / "5f3c0a1e-uuid"
    machine.link(cache_set / "cache0", caching / "bcache")
    machine.link(bcache / "bcache" / "cache", cache_set)
    machine.mount("40 29 250:0 / /srv rw,relatime - xfs /dev/bcache0 rw")
    assert machine.needed() == {AHCI: "backs /srv mounted rw", NVME: "backs /srv mounted rw"}


def test_btrfs_across_two_disks_needs_both(machine: FakeMachine) -> None:
    sata = machine.block(f"{SATA_DISK}/sda1", "8:1", partition=True)
    machine.block(SATA_DISK, "8:0")
    nvme = machine.block(NVME_DISK, "259:0")
    fsid = machine.sys / "fs" / "btrfs" / "0c7f6a4e-fsid"
    machine.link(fsid / "devices" / "sda1", sata)
    machine.link(fsid / "devices" / "nvme0n1", nvme)
    other = machine.sys / "fs" / "btrfs" / "99999999-other"
    (other / "devices").mkdir(parents=True)
    source = block_node(machine, "sda1", "8:1")
    machine.mount(f"29 1 0:45 /@ / rw,relatime - btrfs {source} rw,space_cache=v2")
    assert machine.needed() == {AHCI: "backs / mounted rw", NVME: "backs / mounted rw"}


def zfs_pool(machine: FakeMachine, pool: str, members: dict[str, str] | None) -> None:
    """An imported pool (its kstat directory) and, unless None, udev's data on its members."""
    (machine.proc / "spl" / "kstat" / "zfs" / pool).mkdir(parents=True)
    (machine.proc / "spl" / "kstat" / "zfs" / "arcstats").write_text("")
    udev = machine.sys.parent / "run" / "udev" / "data"
    udev.mkdir(parents=True, exist_ok=True)
    for number, _name in (members or {}).items():
        (udev / f"b{number}").write_text(
            f"S:disk/by-id/x\nE:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL={pool}\nG:systemd\n"
        )


def needed_with_udev(machine: FakeMachine) -> dict[str, str]:
    """gather_facts()'s needs, with udev's database under tmp_path instead of /run."""
    udev = machine.sys.parent / "run" / "udev" / "data"
    storage = Storage(machine.sys, machine.proc, read_mounts(machine.proc), udev_data=udev)
    needed = needed_functions(storage, scan_busy(machine.sys, machine.proc, storage))
    return {str(bdf): reason for bdf, reason in needed.items()}


def test_a_zfs_root_needs_its_pools_members_found_through_udev(machine: FakeMachine) -> None:
    machine.block(NVME_DISK, "259:0")
    machine.block(f"{NVME_DISK}/nvme0n1p3", "259:3", partition=True)
    machine.block(SATA_DISK, "8:0")  # not a member
    zfs_pool(machine, "rpool", {"259:3": "nvme0n1p3"})
    machine.mount("29 1 0:40 / / rw,relatime - zfs rpool/ROOT/debian rw,xattr,posixacl")
    assert needed_with_udev(machine) == {NVME: "in ZFS pool rpool, backs / mounted rw"}


def test_an_imported_zfs_pool_with_nothing_mounted_still_needs_its_members(
    machine: FakeMachine,
) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.block(NVME_DISK, "259:0")
    zfs_pool(machine, "tank", {"8:0": "sda"})
    assert needed_with_udev(machine) == {AHCI: "member of imported ZFS pool tank"}


def test_without_udevs_data_every_disk_may_hold_the_pool(machine: FakeMachine) -> None:
    machine.block(SATA_DISK, "8:0")
    machine.block(NVME_DISK, "259:0")
    machine.block("virtual/block/loop0", "7:0")
    zfs_pool(machine, "tank", None)
    reason = "may hold ZFS pool tank (its members are unknown)"
    assert needed_with_udev(machine) == {AHCI: reason, NVME: reason}


def test_a_zvol_mounted_rw_needs_its_pools_members(machine: FakeMachine) -> None:
    machine.block(NVME_DISK, "259:0")
    machine.block("virtual/block/zd0", "230:0")
    zfs_pool(machine, "tank", {"259:0": "nvme0n1"})
    machine.mount("40 29 230:0 / /vm rw,relatime - ext4 /dev/zd0 rw")
    needed = needed_with_udev(machine)
    assert needed == {NVME: "zvol zd0 in ZFS pool tank, backs /vm mounted rw"}


def test_an_overlay_root_needs_the_file_systems_of_its_layers(
    machine: FakeMachine, tmp_path: Path
) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    put_on_nvme(machine, upper)
    machine.mount(
        f"29 1 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/gone1:/gone2,"
        f"upperdir={upper},workdir={tmp_path}/work"
    )
    assert machine.needed() == {NVME: "backs / mounted rw"}


def test_an_overlay_lower_layer_with_a_colon_is_split_right() -> None:
    assert overlay_directories(r"/a\:b:/c") == ["/a:b", "/c"]


def test_a_file_on_a_network_file_system_is_not_stat_ed_and_needs_every_nic(
    tmp_path: Path,
) -> None:
    net = NetMachine(tmp_path)
    net.nic("eth0", "0000:00:03.0")
    nfs = Mount.parse("50 29 0:60 / /srv/nfs rw,relatime - nfs4 server:/export rw,vers=4.2")
    storage = Storage(net.sys, net.proc, [nfs])
    # Nothing exists at that path here: an answer at all shows no stat() asked the server.
    backings = storage.path("/srv/nfs/images/disk.img")
    assert {(str(b.bdf), b.via) for b in backings} == {
        ("0000:00:03.0", "/srv/nfs/images/disk.img on nfs4")
    }
    assert storage.path("/srv/nfsx/disk.img") == set()  # another mount point's prefix only


def test_a_process_writing_to_a_loop_device_holds_the_disk_of_its_file(
    machine: FakeMachine, tmp_path: Path
) -> None:
    # Unmounted, so only the open fd ties the NVMe to it: what reaches the disk is the loop
    # driver's I/O to the backing file, and the reason says so before naming the process.
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    put_on_nvme(machine, image)
    loop = machine.block("virtual/block/loop0", "7:0")
    (loop / "loop").mkdir()
    (loop / "loop" / "backing_file").write_text(f"{image}\n")
    (loop / "uevent").write_text("MAJOR=7\nDEVNAME=loop0\n")
    process(machine, 10, "dd", {3: ("/dev/loop0", 0o100001)})  # O_WRONLY | O_LARGEFILE
    assert machine.needed() == {NVME: f"loop0 on {image}, in use: /dev/loop0 by pid 10 dd"}
