"""Turn udev's view of /sys/bus/pci into our own frozen records. The only module using pyudev."""

from __future__ import annotations

from pathlib import Path

import pyudev

from petitkexec.bdf import Bdf
from petitkexec.model import PCI_COMMAND, PCI_HEADER_TYPE, PciFunction, Topology

# Non-root reads of `config` stop at 64 bytes (pci_read_config() in pci-sysfs.c); the standard
# header up to there holds all we need: COMMAND and the header type.
CONFIG_HEADER_BYTES = 64


def discover_topology(context: pyudev.Context | None = None) -> Topology:
    """Every PCI function udev knows, with its parent bridge and VF→PF link."""
    context = context or pyudev.Context()
    return Topology.from_functions(
        function_from_udev(device) for device in context.list_devices(subsystem="pci")
    )


def function_from_udev(device: pyudev.Device) -> PciFunction:
    sys_path = Path(device.sys_path)
    attributes = device.attributes
    config = read_config_header(sys_path)
    parent = device.find_parent("pci")
    driver = device.driver
    return PciFunction(
        bdf=Bdf.parse(device.sys_name),
        vendor=_hex_attribute(attributes, "vendor"),
        device=_hex_attribute(attributes, "device"),
        class_code=_hex_attribute(attributes, "class"),
        header_type=config[PCI_HEADER_TYPE] if len(config) > PCI_HEADER_TYPE else None,
        command=_le16(config, PCI_COMMAND),
        driver=driver,
        # drivers with suppress_bind_attrs have no `unbind` file: the one visible sign that
        # the kernel will not let userspace unbind them (driver_sysfs/bus_add_driver).
        driver_can_unbind=driver is not None and (sys_path / "driver" / "unbind").exists(),
        driver_override=_driver_override(attributes),
        parent=Bdf.parse(parent.sys_name) if parent is not None else None,
        physfn=_link_target_bdf(sys_path / "physfn"),
        enabled=_optional_flag(attributes, "enable"),
        reset_methods=tuple(_optional_string(attributes, "reset_method").split()),
        has_reset=(sys_path / "reset").exists(),
        has_reset_subordinate=(sys_path / "reset_subordinate").exists(),
    )


def read_config_header(sys_path: Path) -> bytes:
    """The first 64 bytes of config space, read from the file: pyudev cuts binary at NUL."""
    try:
        with (sys_path / "config").open("rb") as config:
            return config.read(CONFIG_HEADER_BYTES)
    except OSError:
        return b""


def _le16(data: bytes, offset: int) -> int | None:
    # sysfs config bytes are little-endian whatever the CPU (pci_read_config()).
    if len(data) < offset + 2:
        return None
    return int.from_bytes(data[offset : offset + 2], "little")


def _hex_attribute(attributes: pyudev.Attributes, name: str) -> int:
    return int(attributes.asstring(name), 16)


def _optional_string(attributes: pyudev.Attributes, name: str) -> str:
    try:
        return str(attributes.asstring(name))
    except (KeyError, UnicodeDecodeError):
        return ""


def _optional_flag(attributes: pyudev.Attributes, name: str) -> bool | None:
    value = _optional_string(attributes, name).strip()
    return None if value == "" else value != "0"


def _driver_override(attributes: pyudev.Attributes) -> str | None:
    value = _optional_string(attributes, "driver_override").strip()
    return None if value in ("", "(null)") else value


def _link_target_bdf(link: Path) -> Bdf | None:
    try:
        return Bdf.parse(link.resolve(strict=True).name)
    except (OSError, ValueError):
        return None
