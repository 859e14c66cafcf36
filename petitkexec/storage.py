"""What a block device or a file system really sits on, down to PCI functions.

blockdev.py walks sysfs through partitions, dm/md/bcache slaves and nvme multipath; what the
walk ends on without a PCI function is followed here: network block devices to their NICs
(netstorage.py), a loop device to the file system holding its backing file, zram to its
backing_dev, a zvol to its pool. A file system whose st_dev is anonymous (0:x) is followed by
its kind: btrfs through /sys/fs/btrfs/<fsid>/devices/, ZFS to its pool's members, overlay to
the file systems holding its layers.

ZFS: OpenZFS opens its vdevs exclusively (vdev_disk_open() with zfs_vdev_holder) and links no
holder in sysfs, and /proc/spl/kstat/zfs/<pool>/ lists no vdev: without the `zpool` binary the
members are found through udev's database (blkid's ID_FS_TYPE=zfs_member, ID_FS_LABEL=<pool>).
Without it, every disk may be a member: all of them are needed.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.blockdev import functions_behind_block_device, resolve_link, walk_block_device
from petitkexec.mounts import NETWORK_FILESYSTEMS, Mount, mount_holding, overlay_directories
from petitkexec.netstorage import NetworkView, active_network_functions

UDEV_DATA = Path("/run/udev/data")
MAX_DEPTH = 8  # a loop device on a file on a loop device ...: a cycle ends here

Device = tuple[int, int]


@dataclass(frozen=True)
class Backing:
    """A PCI function a block device's I/O reaches, and how when not directly."""

    bdf: Bdf
    via: str = ""  # "carries nbd0 → 10.0.2.100:10809", "in ZFS pool tank"

    def reason(self, why: str) -> str:
        return f"{self.via}, {why}" if self.via else why


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Storage:
    """Resolves block devices, file systems and paths to the PCI functions below them.

    `mounts` is this process's mount table (an anonymous st_dev is looked up there); answers
    are cached for one gather_facts(). `stat_file` is os.stat (tests give it a file system's
    numbers)."""

    sysfs_root: Path
    proc_root: Path
    mounts: Sequence[Mount] = ()
    udev_data: Path = UDEV_DATA
    stat_file: Callable[[str], os.stat_result] = os.stat
    _cache: dict[Device, frozenset[Backing]] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def network(self) -> NetworkView:
        """One per Storage: it keeps what it walked /proc for (kernel-held sockets)."""
        return NetworkView(self.sysfs_root, self.proc_root)

    def block_device(self, device: Device, depth: int = 0) -> frozenset[Backing]:
        if device in self._cache:
            return self._cache[device]
        self._cache[device] = frozenset()  # a cycle back here finds nothing more
        functions, leaves = walk_block_device(self.sysfs_root, device)
        found = {Backing(bdf) for bdf in functions}
        if depth < MAX_DEPTH:
            for leaf in leaves:
                found.update(self._leaf(leaf, depth + 1))
        self._cache[device] = frozenset(found)
        return self._cache[device]

    def _leaf(self, leaf: Path, depth: int) -> set[Backing]:
        name = leaf.name
        if name.startswith("loop"):
            # The file's path as the process that set it up saw it (loop_attr_backing_file_show()).
            backing = _read(leaf / "loop" / "backing_file").removesuffix(" (deleted)")
            return (
                self._via(self.path(backing, depth), f"{name} on {backing}") if backing else set()
            )
        if name.startswith("zram"):
            backing = _read(leaf / "backing_dev")  # "none" without one (backing_dev_show())
            if backing and backing != "none":
                return self._via(self.path(backing, depth), f"{name} writes back to {backing}")
            return set()
        if name.startswith("zd"):
            # A zvol's pool is not in sysfs (only /dev/zvol/POOL/... links udev makes).
            return self.zfs_pools(self.imported_zfs_pools(), f"zvol {name}")
        carriers = self.network.carriers(leaf)
        return {Backing(bdf, reason) for bdf, reason in carriers or ()}

    @staticmethod
    def _via(backings: set[Backing] | frozenset[Backing], how: str) -> set[Backing]:
        return {Backing(b.bdf, b.via or how) for b in backings}

    def path(self, path: str, depth: int = 0, root: str = "") -> set[Backing]:
        """The functions below a file (those of its file system) or a block device node.
        `root` prefixes a path seen in another mount namespace (/proc/PID/root)."""
        holder = mount_holding(self.mounts, path)
        if holder is not None and holder.fstype in NETWORK_FILESYSTEMS:
            # stat() would ask the server, and hang when it is gone: any NIC may carry it.
            how = f"{path} on {holder.fstype}"
            return {Backing(b, how) for b, _ in active_network_functions(self.sysfs_root)}
        # A path in another namespace's table was seen by whoever mounted it: dockerd names
        # overlay layers in the host's tree, `unshare -m` in its own.
        status = self._stat(root + path) if root else None
        status = status or self._stat(path)
        if status is None:
            return set()
        if stat.S_ISBLK(status.st_mode):
            return set(self.block_device(_split(status.st_rdev), depth))
        device = _split(status.st_dev)
        if device[0] != 0:
            return set(self.block_device(device, depth))
        for mount in self.mounts:
            if mount.device == device:
                return self.file_system(mount, depth, root)
        return set()

    def hidden_root(self) -> set[Backing]:
        """The functions below this process's own `/` when no mount in its table is `/`: in a
        chroot whose directory is no mount point, the file system holding it is mounted outside
        the chroot, and show_mountinfo() skips such a mount (seq_path_root() answers SEQ_SKIP
        for a path not reachable from the root of the process whose table it is). stat() of
        /proc/self/root (our root, through procfs's link) still gives its st_dev. It is the
        file system this process runs from (no server of it can be gone without us having hung
        already), and its flags are unknown: needed even when read-only."""
        if any(mount.mount_point == "/" for mount in self.mounts):
            return set()
        return self.path(f"{self.proc_root}/self/root")

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            return self.stat_file(path)
        except OSError:
            return None

    def file_system(self, mount: Mount, depth: int = 0, root: str = "") -> set[Backing]:
        """The functions a mounted file system writes through, by its kind."""
        if depth > MAX_DEPTH:
            return set()
        if mount.fstype == "zfs":
            pool = mount.source.split("/")[0]
            return self.zfs_pools([pool])
        if mount.fstype == "overlay":
            directories = mount.option("upperdir")
            if mount.mount_point == "/" or not directories:
                # The root's programs are read from the lower layers.
                for value in mount.option("lowerdir") + mount.option("lowerdir+"):
                    directories.extend(overlay_directories(value))
            found: set[Backing] = set()
            for directory in directories:
                found |= self.path(directory, depth + 1, root)
            return found
        devices = [mount.device] if mount.device[0] != 0 else self._source_device(mount, root)
        if mount.fstype == "btrfs":
            devices = [d for device in devices for d in self.btrfs_devices(device)]
        found = set()
        for device in devices:
            found |= self.block_device(device, depth)
        return found

    def _source_device(self, mount: Mount, root: str) -> list[Device]:
        """btrfs and friends report an anonymous st_dev: fall back to the source node."""
        if not mount.source.startswith("/"):
            return []
        for candidate in (root + mount.source, mount.source) if root else (mount.source,):
            status = self._stat(candidate)
            if status is not None and status.st_rdev:
                return [_split(status.st_rdev)]
        return []

    def btrfs_devices(self, device: Device) -> list[Device]:
        """Every device of the btrfs whose one device is given (/sys/fs/btrfs/<fsid>/devices/
        links each member's block device, btrfs_sysfs_add_device())."""
        try:
            wanted = resolve_link(self.sysfs_root / "dev" / "block" / f"{device[0]}:{device[1]}")
        except OSError:
            return [device]
        for fsid in _entries(self.sysfs_root / "fs" / "btrfs"):
            members = []
            for link in _entries(fsid / "devices"):
                try:
                    members.append(resolve_link(link))
                except OSError:
                    continue
            if wanted in members:
                return [d for member in members if (d := _device_number(Path(member)))]
        return [device]

    def imported_zfs_pools(self) -> list[str]:
        """Pools imported now: each has a directory of kstats (spa_stats_init()); pools with
        nothing mounted still write (txg syncs, scrubs, resilvers)."""
        kstats = self.proc_root / "spl" / "kstat" / "zfs"
        return sorted(entry.name for entry in _entries(kstats) if entry.is_dir())

    def zfs_pools(self, pools: list[str], how: str = "") -> set[Backing]:
        found: set[Backing] = set()
        members = self._zfs_members()
        for pool in pools:
            via = f"{how + ' ' if how else ''}in ZFS pool {pool}"
            devices = members.get(pool)
            if not devices:
                # Members unknown (no udev database): any disk may be one.
                how_unknown = f"may hold ZFS pool {pool} (its members are unknown)"
                for disk in self._every_disk():
                    bdfs = functions_behind_block_device(self.sysfs_root, disk)
                    found |= {Backing(bdf, how_unknown) for bdf in bdfs}
                continue
            for device in devices:
                found |= self._via(self.block_device(device), via)
        return found

    def _zfs_members(self) -> dict[str, list[Device]]:
        """Pool name → member block devices, from udev's database (b<MAJ>:<MIN> files)."""
        members: dict[str, list[Device]] = {}
        for entry in _entries(self.udev_data):
            if not entry.name.startswith("b"):
                continue
            try:
                text = entry.read_text()
            except OSError:
                continue
            if "E:ID_FS_TYPE=zfs_member\n" not in text:
                continue
            for line in text.splitlines():
                major, _, minor = entry.name[1:].partition(":")
                if line.startswith("E:ID_FS_LABEL=") and major.isdigit() and minor.isdigit():
                    pool = line.removeprefix("E:ID_FS_LABEL=")
                    members.setdefault(pool, []).append((int(major), int(minor)))
        return members

    def _every_disk(self) -> list[Device]:
        disks = []
        for entry in _entries(self.sysfs_root / "dev" / "block"):
            major, _, minor = entry.name.partition(":")
            if major.isdigit() and minor.isdigit():
                disks.append((int(major), int(minor)))
        return disks


def _split(number: int) -> Device:
    return (os.major(number), os.minor(number))


def _device_number(directory: Path) -> Device | None:
    major, _, minor = _read(directory / "dev").partition(":")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []
