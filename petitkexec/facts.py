"""What the running system needs: the PCI functions behind its mounts, swap and console.

Read from mountinfo and sysfs only (no pyudev), with both roots as parameters so tests can
build them under a temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.blockdev import functions_behind_block_device
from petitkexec.errors import PreflightRefused
from petitkexec.inuse import NodeUse, in_use_and_live_update
from petitkexec.model import SystemFacts
from petitkexec.watchdog import watchdogs


@dataclass(frozen=True)
class Mount:
    """One mounted file system, from /proc/self/mountinfo."""

    device: tuple[int, int]  # st_dev of the file system: (major, minor)
    mount_point: str
    fstype: str
    source: str
    writable: bool

    @classmethod
    def parse(cls, line: str) -> Mount:
        """One line of mountinfo(5); ValueError if it is not one."""
        # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 6 or not tail or fields[2].count(":") != 1:
            raise ValueError(f"not a mountinfo line: {line!r}")
        major, minor = fields[2].split(":")
        options = fields[5].split(",")
        super_options = tail[2].split(",") if len(tail) > 2 else []
        return cls(
            device=(int(major), int(minor)),
            mount_point=_unescape(fields[4]),
            fstype=tail[0],
            source=_unescape(tail[1]) if len(tail) > 1 else "",
            writable="rw" in options and "ro" not in super_options,
        )


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    if "\\" not in text:
        return text  # the usual case: no substitution to run for every field of every line
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), text)


def read_mounts(proc_root: Path) -> list[Mount]:
    text = (proc_root / "self" / "mountinfo").read_text()
    return [Mount.parse(line) for line in text.splitlines() if line.strip()]


def gather_facts(sysfs_root: Path, proc_root: Path = Path("/proc")) -> SystemFacts:
    in_use, live_update = in_use_and_live_update(sysfs_root, proc_root)
    return SystemFacts(
        needed=needed_functions(sysfs_root, proc_root, in_use, live_update),
        lockdown=read_lockdown(sysfs_root),
        kexec_loaded=read_kexec_loaded(sysfs_root),
        live_update=live_update,
        powernv=(sysfs_root / "firmware" / "opal").exists(),
    )


def needed_functions(
    sysfs_root: Path, proc_root: Path, in_use: list[NodeUse], live_update: str | None
) -> dict[Bdf, str]:
    """Map each PCI function the running system needs to why, first reason wins."""
    needed: dict[Bdf, str] = {}
    for needs in (
        _mount_needs(sysfs_root, proc_root),
        _swap_needs(sysfs_root, proc_root),
        _console_needs(sysfs_root),
        ((use.bdf, str(use)) for use in in_use),
        _live_update_needs(sysfs_root, live_update),
        _watchdog_needs(sysfs_root),
    ):
        for bdf, reason in needs:
            needed.setdefault(bdf, reason)
    return needed


def _live_update_needs(sysfs_root: Path, live_update: str | None) -> Iterator[tuple[Bdf, str]]:
    """Under Live Update, vfio-pci devices may be preserved across the kexec with their DMA
    running (and no sysfs list says which): none of them may be touched."""
    if live_update is None:
        return
    for entry in _entries(sysfs_root / "bus" / "pci" / "drivers" / "vfio-pci"):
        if entry.is_symlink() and (bdf := Bdf.innermost_in(entry.name)):
            yield bdf, f"vfio-pci under Live Update ({live_update})"


def _watchdog_needs(sysfs_root: Path) -> Iterator[tuple[Bdf, str]]:
    """A running hardware watchdog is what resets a machine whose next kernel hangs;
    unbinding its driver may stop it (watchdog_stop_on_unregister())."""
    for watchdog in watchdogs(sysfs_root):
        if watchdog.active and watchdog.bdf is not None:
            yield watchdog.bdf, f"hardware watchdog {watchdog.name} is running"


def _mount_needs(sysfs_root: Path, proc_root: Path) -> Iterator[tuple[Bdf, str]]:
    """Writable mounts and the root file system (the handoff still runs programs from it)."""
    # Without the mount table nothing tells which disks the running system still writes to:
    # refuse rather than guess.
    try:
        mounts = read_mounts(proc_root)
    except OSError as error:
        raise PreflightRefused(
            f"cannot read {proc_root}/self/mountinfo ({error.strerror}): the disks the "
            "running system needs are unknown",
            hint=f"mount -t proc proc {proc_root}",
        ) from error
    except ValueError as error:
        raise PreflightRefused(f"{proc_root}/self/mountinfo: {error}") from error
    # Only a 9p mount needs the virtio devices' tags; most systems have none.
    has_9p = any(mount.fstype == "9p" for mount in mounts)
    virtio_tags = _virtio_mount_tags(sysfs_root) if has_9p else {}
    network_mounts = [m for m in mounts if m.fstype in NETWORK_FILESYSTEMS]
    if network_mounts:
        first = network_mounts[0]
        for bdf, interface in _active_network_functions(sysfs_root):
            yield bdf, f"{interface} may carry {first.mount_point} ({first.fstype})"
    for mount in mounts:
        if mount.fstype == "9p" and mount.source in virtio_tags:
            # Any mounted 9p share, read-only too, makes its virtio device's remove() wait
            # forever for its users (p9_virtio_remove: "waiting for device in use").
            yield (
                virtio_tags[mount.source],
                f"9p share {mount.source!r} mounted at {mount.mount_point}",
            )
            continue
        if not mount.writable and mount.mount_point != "/":
            continue
        reason = f"backs {mount.mount_point} mounted {'rw' if mount.writable else 'ro'}"
        for device_number in _block_devices_of(mount):
            for bdf in functions_behind_block_device(sysfs_root, device_number):
                yield bdf, reason


# File systems whose data travels over a network interface. Not every fuse.* does (lxcfs,
# gvfsd-fuse, portals): only the ones known to.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "ceph",
        "glusterfs",
        "afs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.ceph-fuse",
        "fuse.s3fs",
        "fuse.rclone",
    }
)


def _active_network_functions(sysfs_root: Path) -> Iterator[tuple[Bdf, str]]:
    """PCI network functions with an interface that is up: we cannot tell which one carries
    a network file system's traffic, so all of them are needed while one is mounted."""
    for interface in _entries(sysfs_root / "class" / "net"):
        try:
            if (interface / "operstate").read_text().strip() not in ("up", "unknown"):
                continue
        except OSError:
            continue
        if bdf := _function_behind(interface / "device"):
            yield bdf, interface.name


def _block_devices_of(mount: Mount) -> list[tuple[int, int]]:
    if mount.device[0] != 0:
        return [mount.device]
    # btrfs and friends report an anonymous st_dev: fall back to the source device node.
    if mount.source.startswith("/dev/"):
        try:
            rdev = os.stat(mount.source).st_rdev
        except OSError:
            return []
        return [(os.major(rdev), os.minor(rdev))] if rdev else []
    return []


def _function_behind(link: Path) -> Bdf | None:
    """The PCI function a sysfs link (a class device, a virtio device) leads to."""
    try:
        return Bdf.innermost_in(str(link.resolve(strict=True)))
    except OSError:
        return None


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _virtio_mount_tags(sysfs_root: Path) -> dict[str, Bdf]:
    tags: dict[str, Bdf] = {}
    for virtio in _entries(sysfs_root / "bus" / "virtio" / "devices"):
        try:
            tag = (virtio / "mount_tag").read_bytes().rstrip(b"\0\n").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if bdf := _function_behind(virtio):
            tags[tag] = bdf
    return tags


def _swap_needs(sysfs_root: Path, proc_root: Path) -> Iterator[tuple[Bdf, str]]:
    try:
        lines = (proc_root / "swaps").read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[1] != "partition":
            continue  # a swap file lives on a mount, which is covered there
        try:
            rdev = os.stat(_unescape(fields[0])).st_rdev
        except OSError:
            continue
        for bdf in functions_behind_block_device(sysfs_root, (os.major(rdev), os.minor(rdev))):
            yield bdf, f"backs active swap {fields[0]}"


def _console_needs(sysfs_root: Path) -> Iterator[tuple[Bdf, str]]:
    """A console on a PCI serial card or a PCI framebuffer (tty0 on fbcon)."""
    try:
        consoles = (sysfs_root / "class" / "tty" / "console" / "active").read_text().split()
    except OSError:
        return
    for name in consoles:
        candidates = [sysfs_root / "class" / "tty" / name / "device"]
        if name.startswith("tty") and name[3:].isdigit():
            candidates.append(sysfs_root / "class" / "graphics" / "fb0" / "device")
        for candidate in candidates:
            if bdf := _function_behind(candidate):
                yield bdf, f"console {name}"
                break


def read_lockdown(sysfs_root: Path) -> str | None:
    """The active lockdown level, shown in brackets: `none [integrity] confidentiality`."""
    try:
        text = (sysfs_root / "kernel" / "security" / "lockdown").read_text()
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match[1] if match else None


def read_kexec_loaded(sysfs_root: Path) -> bool | None:
    try:
        return (sysfs_root / "kernel" / "kexec_loaded").read_text().strip() == "1"
    except OSError:
        return None
