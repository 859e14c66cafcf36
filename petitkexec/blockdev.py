"""Which PCI functions carry a block device's I/O: through partitions, dm/md `slaves` and
nvme multipath. Read from sysfs only, its root a parameter."""

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
    found: set[Bdf] = set()
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
        if lower:
            pending.extend(lower)
            continue
        if bdf := Bdf.innermost_in(str(node)):
            found.add(bdf)
    return found


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
