"""Which PCI functions carry a block device's I/O: through partitions, dm/md/bcache `slaves`,
a bcache device's cache set and nvme multipath. Read from sysfs only, its root a parameter.

What a walk ends on without a PCI function (nbd0, loop0, an NVMe over TCP controller, an iSCSI
session's disk) is handed back as a leaf for petitkexec.storage to follow further."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from petitkexec.bdf import Bdf

MAX_LINK_HOPS = 40  # as the kernel's path walk (MAXSYMLINKS): then ELOOP


def functions_behind_block_device(sysfs_root: Path, device: tuple[int, int]) -> set[Bdf]:
    """Follow a block device (major, minor) through partitions, dm/md `slaves` and nvme
    multipath to PCI."""
    return walk_block_device(sysfs_root, device)[0]


def walk_block_device(sysfs_root: Path, device: tuple[int, int]) -> tuple[set[Bdf], list[Path]]:
    """The PCI functions below a block device, and the sysfs directories the walk ended on
    below no PCI function (its leaves: virtual, network or file-backed devices)."""
    found: set[Bdf] = set()
    leaves: list[Path] = []
    seen: set[Path] = set()
    pending = [sysfs_root / "dev" / "block" / f"{device[0]}:{device[1]}"]
    while pending:
        try:
            node = Path(resolve_link(pending.pop()))
        except OSError:
            continue
        if node in seen:
            continue
        seen.add(node)
        lower = [*_entries(node / "slaves"), *_entries(node / "multipath")]
        if not lower and node.parent.parent.name == "nvme-subsystem":
            # An nvme multipath head (.../nvme-subsystem/nvme-subsysN/nvmeXnY): kernels before
            # its `multipath/` directory only link the subsystem to its controllers, any of
            # which may carry the I/O.
            lower = [
                entry
                for entry in _entries(node.parent)
                if entry.is_symlink() and re.fullmatch(r"nvme\d+", entry.name)
            ]
        if node.parent.name != "block" and (node / "partition").exists():
            lower.append(node.parent)  # a partition sits inside its disk's directory
        # A bcache device links only its backing device as a slave (bd_link_disk_holder() in
        # cached_dev_run()); a write-back cache holds dirty data too: its cache set's cacheN
        # links lead to .../block/sdX/bcache, inside the caching device's directory.
        lower.extend(_bcache_caching_devices(node))
        if lower:
            pending.extend(lower)
            continue
        if bdf := Bdf.innermost_in(str(node)):
            found.add(bdf)
        else:
            leaves.append(node)
    return found, leaves


def _bcache_caching_devices(node: Path) -> list[Path]:
    try:
        cache_set = Path(resolve_link(node / "bcache" / "cache"))
    except OSError:
        return []  # not a bcache device, or one without a cache
    devices = []
    for cache in _entries(cache_set):
        if re.fullmatch(r"cache\d+", cache.name):
            try:
                devices.append(Path(resolve_link(cache)).parent)
            except OSError:
                continue
    return devices


def resolve_link(path: str | os.PathLike[str]) -> str:
    """`os.path.realpath(path, strict=True)` for a sysfs path whose directory is a real one
    (no link on the way to it): /sys/dev/block/MAJ:MIN, a real directory's `slaves/` entry.

    One readlink per link instead of realpath's lstat of every component (a PCIe device
    lies ~10 directories deep; under emulation each costs ms). Right because sysfs links
    lead to kobject directories, and no directory on the way to one is a link itself:
    normalising the target is its real path."""
    current = os.fspath(path)
    for _ in range(MAX_LINK_HOPS):
        try:
            target = os.readlink(current)
        except OSError as error:
            if error.errno == errno.EINVAL:  # not a link: `current` exists and is real
                return current
            raise  # ENOENT: it, or the link's target, is gone (realpath's strict=True)
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.fspath(path))


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []
