"""What the running system needs: the PCI functions behind its mounts (in every mount
namespace), swap, imported ZFS pools and console, through whatever they are stacked on
(petitkexec.storage).

Read from mountinfo, /proc and sysfs only (no pyudev), with both roots as parameters so tests
can build them under a temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.errors import PreflightRefused
from petitkexec.inuse import BusyScan, command_of, scan_busy
from petitkexec.model import SystemFacts
from petitkexec.mounts import NETWORK_FILESYSTEMS, Mount, read_mountinfo, unescape
from petitkexec.netstorage import active_network_functions
from petitkexec.storage import Storage
from petitkexec.watchdog import watchdogs


def read_mounts(proc_root: Path) -> list[Mount]:
    return read_mountinfo(proc_root / "self" / "mountinfo")


def gather_facts(
    sysfs_root: Path,
    proc_root: Path = Path("/proc"),
    stat_file: Callable[[str], os.stat_result] = os.stat,
) -> SystemFacts:
    mounts = _own_mounts(proc_root)
    storage = Storage(sysfs_root, proc_root, mounts, stat_file=stat_file)
    busy = scan_busy(sysfs_root, proc_root, storage)
    return SystemFacts(
        needed=needed_functions(storage, busy),
        lockdown=read_lockdown(sysfs_root),
        kexec_loaded=read_kexec_loaded(sysfs_root),
        live_update=busy.live_update,
        powernv=(sysfs_root / "firmware" / "opal").exists(),
    )


def needed_functions(storage: Storage, busy: BusyScan) -> dict[Bdf, str]:
    """Map each PCI function the running system needs to why, first reason wins."""
    sysfs_root = storage.sysfs_root
    needed: dict[Bdf, str] = {}
    for needs in (
        _mount_needs(storage, storage.mounts),
        _hidden_root_needs(storage),
        _swap_needs(storage),
        _zfs_pool_needs(storage),
        _console_needs(sysfs_root),
        ((use.bdf, str(use)) for use in busy.in_use),
        _other_namespace_needs(storage, busy.mount_namespaces),
        _live_update_needs(sysfs_root, busy.live_update),
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


def _own_mounts(proc_root: Path) -> list[Mount]:
    # Without the mount table nothing tells which disks the running system still writes to:
    # refuse rather than guess.
    try:
        return read_mounts(proc_root)
    except OSError as error:
        raise PreflightRefused(
            f"cannot read {proc_root}/self/mountinfo ({error.strerror}): the disks the "
            "running system needs are unknown",
            hint=f"mount -t proc proc {proc_root}",
        ) from error
    except ValueError as error:
        raise PreflightRefused(f"{proc_root}/self/mountinfo: {error}") from error


def _hidden_root_needs(storage: Storage) -> Iterator[tuple[Bdf, str]]:
    for backing in storage.hidden_root():
        yield (
            backing.bdf,
            backing.reason(
                "backs / of this chroot (its mount lies outside it: not in our mount table)"
            ),
        )


def _mount_needs(
    storage: Storage, mounts: Sequence[Mount], where: str = "", root: str = ""
) -> Iterator[tuple[Bdf, str]]:
    """Writable mounts and the root file system (the handoff still runs programs from it).
    In another process's table, `root` is its /proc/PID/root and `where` says whose it is:
    there the root counts only when writable, as every other mount."""
    # Only a 9p mount needs the virtio devices' tags; most systems have none.
    has_9p = any(mount.fstype == "9p" for mount in mounts)
    virtio_tags = _virtio_mount_tags(storage.sysfs_root) if has_9p else {}
    network_mounts = [m for m in mounts if m.fstype in NETWORK_FILESYSTEMS]
    if network_mounts:
        first = network_mounts[0]
        for bdf, interface in active_network_functions(storage.sysfs_root):
            yield bdf, f"{interface} may carry {first.mount_point} ({first.fstype}){where}"
    for mount in mounts:
        if mount.fstype == "9p" and mount.source in virtio_tags:
            # Any mounted 9p share, read-only too, makes its virtio device's remove() wait
            # forever for its users (p9_virtio_remove: "waiting for device in use").
            yield (
                virtio_tags[mount.source],
                f"9p share {mount.source!r} mounted at {mount.mount_point}{where}",
            )
            continue
        if not mount.writable and (mount.mount_point != "/" or root):
            continue
        reason = f"backs {mount.mount_point} mounted {'rw' if mount.writable else 'ro'}{where}"
        for backing in storage.file_system(mount, root=root):
            yield backing.bdf, backing.reason(reason)


def _other_namespace_needs(
    storage: Storage, namespaces: dict[str, int]
) -> Iterator[tuple[Bdf, str]]:
    """The mount tables of the other mount namespaces (containers, `unshare -m`), read through
    one process in each (/proc/PID/mountinfo, the lowest pid: its init); a mount already in
    our table adds nothing.

    Ours is read through its lowest pid too (pid 1 on a host): the kernel filters a table by
    the root of the process it belongs to (mounts_open_common() takes that task's fs root,
    show_mountinfo() skips what seq_path_root() cannot reach from it), so in a chroot our own
    table lacks every mount outside it, the live root disk's among them, while pid 1's lists
    them. Outside a chroot its lines are all ours, and add nothing."""
    try:
        own = os.readlink(storage.proc_root / "self" / "ns" / "mnt")
    except OSError:
        own = None
    seen = {_identity(mount) for mount in storage.mounts}
    for namespace, pid in sorted(namespaces.items(), key=lambda item: item[1]):
        try:
            lines = (storage.proc_root / str(pid) / "mountinfo").read_text().splitlines()
        except OSError:
            continue  # the process exited meanwhile
        new = []
        for line in lines:
            try:
                mount = Mount.parse(line)
            except ValueError:
                continue  # a table we cannot read adds nothing; ours was refused above
            if (identity := _identity(mount)) not in seen:
                seen.add(identity)
                new.append(mount)
        if new:
            command = command_of(storage.proc_root, pid)
            if namespace == own:
                where = f" as pid {pid} ({command}) sees it, outside this chroot"
            else:
                where = f" in the mount namespace of pid {pid} ({command})"
            yield from _mount_needs(storage, new, where, f"{storage.proc_root}/{pid}/root")


def _identity(mount: Mount) -> tuple[object, ...]:
    """What makes a mount the same as one already seen: most of every other namespace's
    table repeats ours (systemd's PrivateTmp=, ProtectSystem=), each file system is read
    once, through the first table listing it."""
    return (mount.device, mount.fstype, mount.source, mount.writable)


def _zfs_pool_needs(storage: Storage) -> Iterator[tuple[Bdf, str]]:
    """An imported pool writes (txg syncs, scrubs, resilvers) with nothing mounted."""
    pools = storage.imported_zfs_pools()
    if pools:
        for backing in storage.zfs_pools(pools):
            yield backing.bdf, backing.via.replace("in ZFS pool", "member of imported ZFS pool")


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


def _swap_needs(storage: Storage) -> Iterator[tuple[Bdf, str]]:
    """Swap partitions, and swap files through the file system holding them."""
    try:
        lines = (storage.proc_root / "swaps").read_text().splitlines()[1:]
    except OSError:
        return
    for name in [fields[0] for fields in map(str.split, lines) if fields]:
        for backing in storage.path(unescape(name)):
            yield backing.bdf, backing.reason(f"backs active swap {name}")


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
