"""Which PCI functions carry a block device's I/O: through partitions, dm/md `slaves` and
nvme multipath. Read from sysfs only, its root a parameter."""

from __future__ import annotations

import re
from pathlib import Path

from petitkexec.bdf import Bdf


def functions_behind_block_device(sysfs_root: Path, device: tuple[int, int]) -> set[Bdf]:
    """Follow a block device (major, minor) through partitions, dm/md `slaves` and nvme
    multipath to PCI."""
    found: set[Bdf] = set()
    seen: set[Path] = set()
    pending = [sysfs_root / "dev" / "block" / f"{device[0]}:{device[1]}"]
    while pending:
        try:
            node = pending.pop().resolve(strict=True)
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


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []
