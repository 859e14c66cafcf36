"""Hardware watchdogs: the ones already running, and arming one for the handoff.

A watchdog armed across a kexec (systemd's KExecWatchdogSec=, or --watchdog here) is what
resets a machine whose next kernel hangs. Unbinding its driver stops it when the driver asked
for watchdog_stop_on_unregister() (i6300esb does), and drivers that asked for
watchdog_stop_on_reboot() stop it at the kexec itself, unless the running kernel was booted
with watchdog.stop_on_reboot=0.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from petitkexec.bdf import Bdf

# include/uapi/linux/watchdog.h
WDIOC_KEEPALIVE = 0x80045705  # _IOR('W', 5, int)
WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
# PCI watchdog drivers, by the name /sys/bus/pci/drivers shows, seen calling
# watchdog_stop_on_reboot() in their probe: their watchdog dies at the kexec unless the kernel
# runs with watchdog.stop_on_reboot=0. i6300esb registers as "i6300ESB timer" (ESB_MODULE_NAME
# in drivers/watchdog/i6300esb.c). Others are not known to; add them with their source.
STOPS_ON_REBOOT = frozenset({"i6300ESB timer"})


@dataclass(frozen=True)
class Watchdog:
    """A hardware watchdog, as /sys/class/watchdog shows it."""

    name: str  # watchdog0
    bdf: Bdf | None  # the PCI function it belongs to, None for a platform watchdog
    driver: str | None
    active: bool

    @property
    def node(self) -> str:
        return f"/dev/{self.name}"


def watchdogs(sysfs_root: Path) -> Iterator[Watchdog]:
    directory = sysfs_root / "class" / "watchdog"
    try:
        # Not glob("watchdog*"): it compiles a pattern, at every start, for a prefix.
        names = sorted(name for name in os.listdir(directory) if name.startswith("watchdog"))
    except OSError:
        return
    for entry in (directory / name for name in names):
        try:
            state = (entry / "state").read_text().strip()
        except OSError:
            state = ""
        bdf, driver = _function_of(sysfs_root, entry)
        yield Watchdog(entry.name, bdf, driver, state == "active")


def _function_of(sysfs_root: Path, entry: Path) -> tuple[Bdf | None, str | None]:
    """The PCI function behind a watchdog and its driver, (None, None) if none is known."""
    try:
        device = (entry / "device").resolve(strict=True)
        return Bdf.innermost_in(str(device)), os.path.basename(os.readlink(device / "driver"))
    except OSError:
        pass
    # A driver that registers its watchdog without a parent leaves it under
    # /sys/devices/virtual/watchdog/ (i6300esb in Linux 6.1, seen in the q35 guest). Its
    # `identity` is then the only link back: i6300esb names its watchdog after its PCI driver.
    try:
        identity = (entry / "identity").read_text().strip()
        bound = [
            bdf
            for link in (sysfs_root / "bus" / "pci" / "drivers" / identity).iterdir()
            if (bdf := Bdf.innermost_in(link.name)) is not None
        ]
    except (OSError, ValueError):
        return None, None
    return (bound[0], identity) if len(bound) == 1 else (None, None)


def stop_on_reboot(sysfs_root: Path, watchdog: Watchdog) -> str | None:
    """Why the running kernel would stop this watchdog at the kexec, or None if it won't."""
    try:
        setting = sysfs_root / "module" / "watchdog" / "parameters" / "stop_on_reboot"
        value = setting.read_text().strip()
    except OSError:
        value = "-1"  # the parameter's default: each driver decides
    if value == "1":
        return "watchdog.stop_on_reboot=1"
    if value == "0":
        return None
    if watchdog.driver in STOPS_ON_REBOOT:
        return f"{watchdog.driver} stops it on reboot (boot with watchdog.stop_on_reboot=0)"
    return None


def disarm(watchdog: Watchdog) -> None:
    """Stop it again (the magic close: write 'V', then close). A driver loaded with
    nowayout keeps it running whatever we write; the caller says so."""
    fd = os.open(watchdog.node, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"V")
    finally:
        os.close(fd)


def arm(watchdog: Watchdog, timeout_s: int) -> None:
    """Start it with `timeout_s` and leave it running: closing without the magic 'V' keeps
    a watchdog going (watchdog_release: "watchdog did not stop!")."""
    fd = os.open(watchdog.node, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", timeout_s))
        fcntl.ioctl(fd, WDIOC_KEEPALIVE, struct.pack("i", 0))
    finally:
        os.close(fd)
