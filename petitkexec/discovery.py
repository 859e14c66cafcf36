"""Turn /sys/bus/pci into our own frozen records: through pyudev, or sysfs itself without libudev.

The only module that imports pyudev. Both ways read the same attributes through the same
helpers (petitkexec.attributes), so they build the same model; tests compare them.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from petitkexec.attributes import (
    le16,
    parse_count,
    parse_driver_override,
    parse_hex,
    parse_words,
)
from petitkexec.bdf import Bdf
from petitkexec.errors import PreflightRefused
from petitkexec.log import get_logger
from petitkexec.model import PCI_COMMAND, PCI_HEADER_TYPE, PciFunction, Topology

# Non-root reads of `config` stop at 64 bytes (pci_read_config() in pci-sysfs.c); the standard
# header up to there holds all we need: COMMAND and the header type.
CONFIG_HEADER_BYTES = 64
# pyudev finds libudev with ctypes.util.find_library(), which runs `/sbin/ldconfig -p`: images
# without an ldconfig binary (buildroot, busybox initramfs, musl) then fail although the
# library is there (pyudev #83, #532). The dynamic loader finds it by its soname on its own.
LIBUDEV_SONAME = "libudev.so.1"

AttributeReader = Callable[[str], "str | None"]


def discover_topology(sysfs_root: Path) -> Topology:
    """Every PCI function under `sysfs_root`, with its parent bridge and VF→PF link."""
    if not (sysfs_root / "bus" / "pci").is_dir():
        raise PreflightRefused(
            f"{sysfs_root}/bus/pci is missing: sysfs is not mounted there, or this kernel "
            "has no PCI",
            hint=f"mount -t sysfs sysfs {sysfs_root}",
        )
    context = udev_context()
    if context is None:
        get_logger("petitkexec").warning(
            "libudev not found; discovering from sysfs directly", sysfs=str(sysfs_root)
        )
        functions: Iterable[PciFunction | None] = map(
            function_from_sysfs, _sysfs_functions(sysfs_root)
        )
    else:
        functions = map(function_from_udev, context.list_devices(subsystem="pci"))
    return Topology.from_functions(f for f in functions if f is not None)


def udev_context() -> Any:
    """A pyudev Context, or None when pyudev or libudev cannot be loaded."""
    try:
        import pyudev
        from pyudev._ctypeslib import utils
    except ImportError:
        return None
    utils.find_library = _library_by_soname_first
    try:
        return pyudev.Context()
    except (ImportError, OSError):
        return None


def _library_by_soname_first(name: str) -> str | None:
    if name == "udev":
        try:
            ctypes.CDLL(LIBUDEV_SONAME)
        except OSError:
            pass
        else:
            return LIBUDEV_SONAME
    return ctypes.util.find_library(name)


def function_from_udev(device: Any) -> PciFunction | None:
    """None when the function vanished while it was being read."""
    attributes = device.attributes

    def read(name: str) -> str | None:
        try:
            return str(attributes.asstring(name))
        except (KeyError, UnicodeDecodeError, OSError):
            return None

    parent = device.find_parent("pci")
    return build_function(
        Path(device.sys_path),
        read,
        driver=device.driver,
        parent=Bdf.parse(parent.sys_name) if parent is not None else None,
    )


def function_from_sysfs(sys_path: Path) -> PciFunction | None:
    """The same record from the files; `sys_path` is the function's real directory."""

    def read(name: str) -> str | None:
        try:
            return (sys_path / name).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    try:
        driver: str | None = os.path.basename(os.readlink(sys_path / "driver"))
    except OSError:
        driver = None
    # The parent bridge is the nearest directory above that is a PCI function, as udev's
    # parent chain has it (/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0).
    parent = Bdf.innermost_in(str(sys_path.parent))
    return build_function(sys_path, read, driver=driver, parent=parent)


def _sysfs_functions(sysfs_root: Path) -> Iterator[Path]:
    devices = sysfs_root / "bus" / "pci" / "devices"
    for link in sorted(devices.iterdir()):
        try:
            yield link.resolve(strict=True)
        except OSError:
            continue  # removed since the listing


def build_function(
    sys_path: Path, read: AttributeReader, *, driver: str | None, parent: Bdf | None
) -> PciFunction | None:
    try:
        bdf = Bdf.parse(sys_path.name)
    except ValueError:
        return None
    vendor, device, class_code = (parse_hex(read(name)) for name in ("vendor", "device", "class"))
    if vendor is None or device is None or class_code is None:
        return None  # gone while we read it (or not a function we can make sense of)
    config = read_config_header(sys_path)
    enable_count = parse_count(read("enable"))
    # Plain strings for the files only tested for: joining Paths costs more than the stat.
    directory = os.fspath(sys_path)
    return PciFunction(
        bdf=bdf,
        vendor=vendor,
        device=device,
        class_code=class_code,
        header_type=config[PCI_HEADER_TYPE] if len(config) > PCI_HEADER_TYPE else None,
        command=le16(config, PCI_COMMAND),
        driver=driver,
        # drivers with suppress_bind_attrs have no `unbind` file: the one visible sign that
        # the kernel will not let userspace unbind them (driver_sysfs/bus_add_driver).
        driver_can_unbind=driver is not None and os.path.exists(f"{directory}/driver/unbind"),
        driver_override=parse_driver_override(read("driver_override")),
        parent=parent,
        physfn=_link_target_bdf(f"{directory}/physfn"),
        enabled=None if enable_count is None else enable_count > 0,
        reset_methods=parse_words(read("reset_method")),
        has_reset=os.path.exists(f"{directory}/reset"),
        has_reset_subordinate=os.path.exists(f"{directory}/reset_subordinate"),
    )


def read_config_header(sys_path: Path) -> bytes:
    """The first 64 bytes of config space, read from the file: pyudev cuts binary at NUL."""
    try:
        with (sys_path / "config").open("rb") as config:
            return config.read(CONFIG_HEADER_BYTES)
    except OSError:
        return b""


def _link_target_bdf(link: str) -> Bdf | None:
    # The link names the function's directory (`physfn` -> ../0000:01:00.0): one readlink,
    # where resolve() would lstat every directory up to /sys first.
    try:
        return Bdf.parse(os.path.basename(os.readlink(link)))
    except (OSError, ValueError):
        return None
