"""Which PCI functions a process is using: their device nodes, matched against open files.

A function in use is exactly one whose remove() blocks or loses data: NVIDIA's remove() waits
while the GPU's usage count is non-zero, vfio-pci's waits for its user to let go, and
unbinding a disk open for writing drops the writes in flight. Read from sysfs and /proc only,
both roots parameters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.blockdev import resolve_link
from petitkexec.storage import Backing, Storage

# O_ACCMODE bits of the `flags:` line in /proc/PID/fdinfo/FD (octal).
O_ACCMODE = 0o3
O_RDONLY = 0
LIVEUPDATE_NODE = "/dev/liveupdate"  # held open by the Live Update agent (LUO, 6.19)


@dataclass(frozen=True)
class NodeUse:
    """One process holding one device node of a PCI function open."""

    bdf: Bdf
    node: str  # /dev/... as the process opened it
    pid: int
    command: str
    via: str = ""  # how the node's I/O reaches the function: "carries nbd0 → 10.0.2.100:10809"

    def __str__(self) -> str:
        use = f"in use: {self.node} by pid {self.pid} {self.command}"
        return f"{self.via}, {use}" if self.via else use


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class ProcessScan:
    """What one walk over every process found: the device nodes held open, and one process
    in each mount namespace (namespace link text → the lowest pid in it)."""

    held: list[tuple[str, int, int]]
    mount_namespaces: dict[str, int]


def device_nodes(
    sysfs_root: Path, proc_root: Path, storage: Storage
) -> dict[str, tuple[bool, tuple[Backing, ...]]]:
    """/dev path → (is a block device, the PCI functions behind it), for every device node
    below a PCI function: block (through network block devices, loop, zram, ... too), nvme,
    drm, sound, input, tty, hidraw, watchdog, vfio."""
    nodes: dict[str, tuple[bool, tuple[Backing, ...]]] = {}
    for kind in ("char", "block"):
        # Plain strings, not Paths: there are hundreds of these links (every tty, every
        # partition), and most lead to no PCI function.
        for link in _scandir(sysfs_root / "dev" / kind):
            try:
                target = resolve_link(link.path)
                if kind == "block":
                    functions = _functions_of_block_device(storage, link.name)
                else:
                    functions = tuple(Backing(b) for b in _functions_of(sysfs_root, target))
                name = _devname(target) if functions else None
            except OSError:
                continue
            if name is not None:
                nodes[f"/dev/{name}"] = (kind == "block", functions)
    nodes.update(_nvidia_nodes(proc_root))
    return nodes


def _devname(device: str) -> str | None:
    for line in Path(device, "uevent").read_text().splitlines():
        if line.startswith("DEVNAME="):
            return line.removeprefix("DEVNAME=")
    return None


def _functions_of_block_device(storage: Storage, number: str) -> tuple[Backing, ...]:
    """A block device's functions, `number` as /sys/dev/block names it (MAJ:MIN). An nvme
    namespace is a multipath head outside the PCI tree (/sys/devices/virtual/nvme-subsystem/)
    whenever the controller has a subsystem (seen in the q35 guest, Linux 6.1); dm and md
    devices are virtual too."""
    major, _, minor = number.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return ()
    backings = storage.block_device((int(major), int(minor)))
    return tuple(sorted(backings, key=lambda backing: (backing.bdf, backing.via)))


def _functions_of(sysfs_root: Path, device: str) -> tuple[Bdf, ...]:
    bdf = Bdf.innermost_in(device)
    if bdf is not None:
        return (bdf,)
    # A VFIO group's node (/dev/vfio/N, noiommu-N) is a virtual device: its functions are
    # the members of IOMMU group N.
    parent, name = os.path.split(device)
    if os.path.basename(parent) == "vfio":
        group = name.removeprefix("noiommu-")
        members = _entries(sysfs_root / "kernel" / "iommu_groups" / group / "devices")
        return tuple(sorted(b for m in members if (b := Bdf.innermost_in(m.name))))
    return ()


def _nvidia_nodes(proc_root: Path) -> Iterator[tuple[str, tuple[bool, tuple[Backing, ...]]]]:
    """NVIDIA's /dev/nvidiaN are not in sysfs; the driver's proc file names the minor."""
    for gpu in _entries(proc_root / "driver" / "nvidia" / "gpus"):
        try:
            information = (gpu / "information").read_text()
            bdf = Bdf.parse(gpu.name)
        except (OSError, ValueError):
            continue
        match = re.search(r"^Device Minor:\s*(\d+)", information, re.M)
        if match:
            yield f"/dev/nvidia{match[1]}", (False, (Backing(bdf),))


def open_nodes(proc_root: Path, wanted: set[str]) -> Iterator[tuple[str, int, int]]:
    """(node, pid, fd) for every open file of every process whose path is in `wanted`.

    One readlink per open file and a set lookup, no stat (a stat through the fd link asks the
    file's own file system, which hangs on an NFS server that is gone), so thousands of
    processes stay cheap (bench/inuse_scan.py)."""
    yield from scan_processes(proc_root, wanted).held


def scan_processes(proc_root: Path, wanted: set[str]) -> ProcessScan:
    """open_nodes(), and each process's mount namespace (/proc/PID/ns/mnt names it:
    `mnt:[4026531841]`) from the same walk: a mount made inside a container is in no other
    process's table."""
    root = os.fspath(proc_root)
    held: list[tuple[str, int, int]] = []
    namespaces: dict[str, int] = {}
    for name in _listdir(root):
        if name.isdigit():
            pid = int(name)
            files, namespace = _held_open(f"{root}/{name}/fd", wanted)
            held.extend((target, pid, fd) for target, fd in files)
            # The lowest pid of a namespace is its init, whose root is the namespace's: its
            # table lists every mount (a table omits what its process's root cannot reach).
            if namespace is not None and pid < namespaces.get(namespace, pid + 1):
                namespaces[namespace] = pid
    return ProcessScan(held, namespaces)


def _held_open(fd_directory: str, wanted: set[str]) -> tuple[list[tuple[str, int]], str | None]:
    """(path, fd) of one process's open files whose path is in `wanted`, and its mount
    namespace. readlinkat() relative to the open fd directory: the kernel looks up one name
    per file instead of walking /proc/PID/fd/ again, the PID and its access check at every
    step (`../ns/mnt` too: procfs's fd directory has the PID's directory as parent)."""
    try:
        directory = os.open(fd_directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return [], None  # the process exited meanwhile, or its files are not ours to read
    try:
        files = [
            (target, int(fd))
            for fd in _listdir(directory)
            if (target := _readlink_at(directory, fd)) in wanted
        ]
        return files, _readlink_at(directory, "../ns/mnt")
    finally:
        os.close(directory)


def _readlink_at(directory: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=directory)
    except OSError:
        return None  # closed or the process exited meanwhile


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class BusyScan:
    in_use: list[NodeUse]
    live_update: str | None  # why Live Update may preserve devices across this kexec
    mount_namespaces: dict[str, int]  # namespace → one pid in it


def scan_busy(sysfs_root: Path, proc_root: Path, storage: Storage) -> BusyScan:
    """Functions in use, Live Update and every mount namespace, from one walk over every
    process's open files: the walk is most of their cost."""
    nodes = device_nodes(sysfs_root, proc_root, storage)
    scan = scan_processes(proc_root, {*nodes, LIVEUPDATE_NODE})
    return BusyScan(
        _uses(proc_root, nodes, scan.held),
        _live_update(proc_root, scan.held),
        scan.mount_namespaces,
    )


def _uses(
    proc_root: Path,
    nodes: dict[str, tuple[bool, tuple[Backing, ...]]],
    held: list[tuple[str, int, int]],
) -> list[NodeUse]:
    uses: list[NodeUse] = []
    for node, pid, fd in held:
        if node not in nodes:
            continue  # /dev/liveupdate, held for _live_update
        is_block, functions = nodes[node]
        if is_block and not _open_for_writing(proc_root, pid, fd):
            continue
        command = command_of(proc_root, pid)
        uses.extend(NodeUse(b.bdf, node, pid, command, b.via) for b in functions)
    return uses


def _live_update(proc_root: Path, held: list[tuple[str, int, int]]) -> str | None:
    """The agent holds /dev/liveupdate, or the kernel was booted with liveupdate= or kho=."""
    try:
        words = (proc_root / "cmdline").read_text().split()
    except OSError:
        words = []
    # Each occurrence is parsed in turn (parse_early_param), so the last valid one wins.
    enabled_by: dict[str, str | None] = {}
    for word in words:
        key, _, value = word.partition("=")
        if key in ("liveupdate", "kho") and (on := _kstrtobool(value)) is not None:
            enabled_by[key] = word if on else None
    for setting in enabled_by.values():
        if setting is not None:
            return f"{setting} on the kernel command line"
    for node, pid, _fd in held:
        if node == LIVEUPDATE_NODE:
            return f"{LIVEUPDATE_NODE} held by pid {pid} {command_of(proc_root, pid)}"
    return None


def _kstrtobool(value: str) -> bool | None:
    """A boolean parameter as kstrtobool() (lib/kstrtox.c) reads it, which both liveupdate=
    and kho= use (early_liveupdate_param, kho_parse_enable): y/t/1/on, n/f/0/off by their
    first letters, any case; None where it answers -EINVAL and leaves the setting as it was
    (a bare `kho` too)."""
    first, second = value[:1].lower(), value[1:2].lower()
    if first in ("y", "t", "1") or (first, second) == ("o", "n"):
        return True
    if first in ("n", "f", "0") or (first, second) == ("o", "f"):
        return False
    return None


def _open_for_writing(proc_root: Path, pid: int, fd: int) -> bool:
    try:
        text = (proc_root / str(pid) / "fdinfo" / str(fd)).read_text()
    except OSError:
        return True  # cannot tell: assume the worst
    match = re.search(r"^flags:\s*([0-7]+)", text, re.M)
    return match is None or int(match[1], 8) & O_ACCMODE != O_RDONLY


def command_of(proc_root: Path, pid: int) -> str:
    try:
        return (proc_root / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _scandir(directory: Path | str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError:
        return []


def _listdir(directory: str | int) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _entries(directory: Path) -> list[Path]:
    return [Path(entry.path) for entry in _scandir(directory)]
