"""Hardware watchdogs: the ones already running, and arming one for the handoff.

A watchdog armed across a kexec (systemd's KExecWatchdogSec=, or --watchdog here) is what
resets a machine whose next kernel hangs. Unbinding its driver stops it when the driver asked
for watchdog_stop_on_unregister() (i6300esb does); `why_it_stops` says whether the running
kernel would stop it before the next kernel runs.
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
WDIOF_MAGICCLOSE = 0x0100  # the driver supports the magic close character 'V'


@dataclass(frozen=True)
class DriverFacts:
    """What a watchdog driver does that sysfs does not show (or not on every kernel)."""

    stops_on_reboot: bool  # calls watchdog_stop_on_reboot() when it registers
    magic_close: bool  # WDIOF_MAGICCLOSE in its watchdog_info.options
    kernel_timer: bool = False  # a timer of the running kernel, not hardware


# By the watchdog's `identity` (its watchdog_info.identity), as read in drivers/watchdog/ of
# Linux 6.1.192 (Debian 12) and 7.2.13 (Debian unstable); the two agree on every entry.
# Drivers that are not here are refused unless the kernel runs with watchdog.stop_on_reboot=0
# (then no driver stops at reboot): add one with the file it was read from.
DRIVERS: dict[str, DriverFacts] = {
    "i6300ESB timer": DriverFacts(True, True),  # i6300esb.c (QEMU's q35 watchdog)
    "iTCO_wdt": DriverFacts(True, True),  # iTCO_wdt.c (Intel chipsets)
    "SP5100 TCO timer": DriverFacts(True, True),  # sp5100_tco.c (AMD chipsets)
    "wdat_wdt": DriverFacts(True, True),  # wdat_wdt.c (ACPI WDAT)
    "xen_wdt": DriverFacts(True, True),  # xen_wdt.c
    "pseries-wdt": DriverFacts(True, True),  # pseries-wdt.c (PowerVM)
    "SBSA Generic Watchdog": DriverFacts(True, True),  # sbsa_gwdt.c (Arm servers)
    "W83627HF Watchdog": DriverFacts(True, True),  # w83627hf_wdt.c (Nuvoton/Winbond Super I/O)
    "IT87 WDT": DriverFacts(True, True),  # it87_wdt.c (ITE Super I/O)
    "HPE iLO2+ HW Watchdog Timer": DriverFacts(False, True),  # hpwdt.c
    "Intel Atom E6xx Watchdog": DriverFacts(False, True),  # ie6xx_wdt.c
    "TQMx86 Watchdog": DriverFacts(False, False),  # tqmx86_wdt.c
    "iamt_wdt": DriverFacts(True, False),  # mei_wdt.c (Intel AMT)
    # softdog.c: an hrtimer of the running kernel; it ends with that kernel, whatever it asks.
    "Software Watchdog": DriverFacts(True, True, kernel_timer=True),
}


@dataclass(frozen=True)
class Watchdog:
    """A hardware watchdog, as /sys/class/watchdog shows it."""

    name: str  # watchdog0
    bdf: Bdf | None  # the PCI function it belongs to, None for a platform watchdog
    driver: str | None
    active: bool
    identity: str | None = None  # its driver's watchdog_info.identity

    @property
    def known_as(self) -> str:
        return self.identity or self.driver or self.name

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
        identity = _attribute(entry, "identity")
        bdf, driver = _function_of(sysfs_root, entry, identity)
        yield Watchdog(entry.name, bdf, driver, _attribute(entry, "state") == "active", identity)


def _attribute(entry: Path, name: str) -> str | None:
    try:
        return (entry / name).read_text().strip()
    except OSError:
        return None


def _function_of(
    sysfs_root: Path, entry: Path, identity: str | None
) -> tuple[Bdf | None, str | None]:
    """The PCI function behind a watchdog and its driver, (None, None) if none is known."""
    try:
        device = (entry / "device").resolve(strict=True)
        return Bdf.innermost_in(str(device)), os.path.basename(os.readlink(device / "driver"))
    except OSError:
        pass
    # A driver that registers its watchdog without a parent leaves it under
    # /sys/devices/virtual/watchdog/ (i6300esb in Linux 6.1, seen in the q35 guest). Its
    # `identity` is then the only link back: i6300esb names its watchdog after its PCI driver.
    if identity is None:
        return None, None
    try:
        bound = [
            bdf
            for link in (sysfs_root / "bus" / "pci" / "drivers" / identity).iterdir()
            if (bdf := Bdf.innermost_in(link.name)) is not None
        ]
    except (OSError, ValueError):
        return None, None
    return (bound[0], identity) if len(bound) == 1 else (None, None)


def why_it_stops(sysfs_root: Path, watchdog: Watchdog) -> str | None:
    """Why the running kernel would stop this watchdog, once armed, before the next kernel
    runs; None if it would not."""
    facts = DRIVERS.get(watchdog.known_as)
    if facts is not None and facts.kernel_timer:
        return f"{watchdog.known_as} is a timer of the running kernel: it ends with it"
    return _stops_at_close(sysfs_root, watchdog, facts) or _stops_at_kexec(
        sysfs_root, watchdog, facts
    )


def _stops_at_close(sysfs_root: Path, watchdog: Watchdog, facts: DriverFacts | None) -> str | None:
    """arm() closes the device without the magic 'V'. watchdog_release() stops the watchdog
    all the same when its driver lacks WDIOF_MAGICCLOSE, unless nowayout is set."""
    entry = sysfs_root / "class" / "watchdog" / watchdog.name
    if _attribute(entry, "nowayout") == "1":
        return None
    # `options` is in sysfs since April 2023 (Linux 7.2 has it, 6.1 does not).
    options = _attribute(entry, "options")
    if options is not None:
        try:
            magic_close = bool(int(options, 16) & WDIOF_MAGICCLOSE)
        except ValueError:
            magic_close = None
    else:
        magic_close = None if facts is None else facts.magic_close
    if magic_close is None:
        return (
            f"{watchdog.known_as}: whether closing {watchdog.node} stops it is not known "
            "(no `options` in sysfs, and not in petitkexec's table)"
        )
    if not magic_close:
        return (
            f"{watchdog.known_as} has no magic close (WDIOF_MAGICCLOSE): closing "
            f"{watchdog.node} stops it (its nowayout is 0)"
        )
    return None


def _stops_at_kexec(sysfs_root: Path, watchdog: Watchdog, facts: DriverFacts | None) -> str | None:
    """kernel_kexec() -> kernel_restart_prepare() runs the reboot notifiers (SYS_RESTART);
    watchdog_reboot_notifier() stops a running watchdog whose driver called
    watchdog_stop_on_reboot(), unless watchdog.stop_on_reboot= overrides every driver. The
    notifier calls the driver's stop() itself: nowayout does not keep it running."""
    parameters = sysfs_root / "module" / "watchdog" / "parameters"
    value = _attribute(parameters, "stop_on_reboot") or "-1"  # the default: each driver decides
    if value == "1":
        return "watchdog.stop_on_reboot=1: the kernel stops every watchdog at reboot"
    if value == "0":
        return None
    if facts is None:
        return (
            f"{watchdog.known_as}: whether its driver stops it at reboot is not known "
            "(not in petitkexec's table; boot with watchdog.stop_on_reboot=0 to keep it running)"
        )
    if facts.stops_on_reboot:
        return (
            f"{watchdog.known_as} stops it on reboot (watchdog_stop_on_reboot(); "
            "boot with watchdog.stop_on_reboot=0)"
        )
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
