"""The one place that touches the kernel's PCI sysfs. Its root is a parameter, for tests.

Reads go straight to files. Writes go through a `SysfsWriter`, the syscall boundary, so a
simulated kernel in the tests can react to them as the real one does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from petitkexec.attributes import le16, parse_count, parse_driver_override
from petitkexec.bdf import Bdf
from petitkexec.deadline import Child, start_child
from petitkexec.environment import SYSFS_ROOT
from petitkexec.errors import KernelWriteFailed
from petitkexec.model import PCI_BRIDGE_CONTROL, PCI_COMMAND


class SysfsWriter(Protocol):
    def write(self, path: Path, data: bytes, offset: int | None = None) -> None:
        """One write(2) (or pwrite(2) at `offset`); raises OSError as the kernel answered."""


class RealSysfsWriter:
    def write(self, path: Path, data: bytes, offset: int | None = None) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
            if written != len(data):
                raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
        finally:
            os.close(fd)


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(eq=False)
class Kernel:
    """PCI sysfs under `root`: every read and write petitkexec does to the running kernel."""

    root: Path = SYSFS_ROOT
    writer: SysfsWriter = field(default_factory=RealSysfsWriter)
    sleep: Callable[[float], None] = time.sleep

    def device_dir(self, bdf: Bdf) -> Path:
        return self.root / "bus" / "pci" / "devices" / str(bdf)

    def _driver_dir(self, driver: str) -> Path:
        return self.root / "bus" / "pci" / "drivers" / driver

    def exists(self, bdf: Bdf) -> bool:
        return self.device_dir(bdf).exists()

    # -- reads -------------------------------------------------------------------------------

    def driver(self, bdf: Bdf) -> str | None:
        try:
            return os.path.basename(os.readlink(self.device_dir(bdf) / "driver"))
        except OSError:
            return None

    def read_config16(self, bdf: Bdf, offset: int) -> int | None:
        """A 16-bit config register, little-endian as sysfs gives it; None if unreadable."""
        try:
            with (self.device_dir(bdf) / "config").open("rb") as config:
                config.seek(offset)
                return le16(config.read(2), 0)
        except OSError:
            return None

    def read_command(self, bdf: Bdf) -> int | None:
        return self.read_config16(bdf, PCI_COMMAND)

    def read_attribute(self, bdf: Bdf, name: str) -> str | None:
        try:
            return (self.device_dir(bdf) / name).read_text().strip()
        except OSError:
            return None

    def driver_override(self, bdf: Bdf) -> str | None:
        return parse_driver_override(self.read_attribute(bdf, "driver_override"))

    def read_enable_count(self, bdf: Bdf) -> int | None:
        return parse_count(self.read_attribute(bdf, "enable"))

    def read_sriov_numvfs(self, bdf: Bdf) -> int | None:
        return parse_count(self.read_attribute(bdf, "sriov_numvfs"))

    def read_sriov_drivers_autoprobe(self, bdf: Bdf) -> bool | None:
        value = self.read_attribute(bdf, "sriov_drivers_autoprobe")
        return None if value is None else value == "1"

    def module_parameter(self, module: str, name: str) -> str | None:
        """A loaded module's parameter (`/sys/module/MODULE/parameters/NAME`), if readable."""
        try:
            return (self.root / "module" / module / "parameters" / name).read_text().strip()
        except OSError:
            return None

    def has_attribute(self, bdf: Bdf, name: str) -> bool:
        return (self.device_dir(bdf) / name).exists()

    def is_powernv(self) -> bool:
        """OPAL firmware: bus resets must go through it (pnv_pci_reset_secondary_bus)."""
        return (self.root / "firmware" / "opal").exists()

    # -- writes ------------------------------------------------------------------------------

    def _write(self, path: Path, text: str, offset: int | None = None) -> None:
        self._write_bytes(path, text.encode(), offset)

    def _write_confined(self, path: Path, data: bytes, offset: int | None = None) -> None:
        """Write only where the path really leads under the sysfs root: a link (or a file
        put in its place) that leads elsewhere is refused, whatever it points at."""
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise OSError(errno.EXDEV, f"{path} leads outside {self.root} (to {real}): refused")
        self.writer.write(path, data, offset)

    def _write_bytes(self, path: Path, data: bytes, offset: int | None = None) -> None:
        try:
            self._write_confined(path, data, offset)
        except OSError as error:
            raise KernelWriteFailed(
                str(path), error.errno or errno.EIO, error.strerror or ""
            ) from error

    def write_config16(self, bdf: Bdf, offset: int, value: int) -> None:
        # A 2-byte pwrite is one 16-bit config cycle (pci_write_config() in pci-sysfs.c).
        self._write_bytes(self.device_dir(bdf) / "config", value.to_bytes(2, "little"), offset)

    def write_command(self, bdf: Bdf, value: int) -> None:
        self.write_config16(bdf, PCI_COMMAND, value)

    def write_bridge_control(self, bdf: Bdf, value: int) -> None:
        self.write_config16(bdf, PCI_BRIDGE_CONTROL, value)

    def read_bridge_control(self, bdf: Bdf) -> int | None:
        return self.read_config16(bdf, PCI_BRIDGE_CONTROL)

    def set_driver_override(self, bdf: Bdf, value: str | None) -> None:
        # An empty write clears the override (driver_override_store()).
        self._write(self.device_dir(bdf) / "driver_override", value or "\n")

    def write_sriov_drivers_autoprobe(self, bdf: Bdf, on: bool) -> None:
        self._write(self.device_dir(bdf) / "sriov_drivers_autoprobe", "1" if on else "0")

    # The calls below block in the kernel (remove(), link training after a reset) and run in
    # a child that may be abandoned at its deadline; see petitkexec.deadline.

    def _start_write(self, path: Path, text: str, timeout_s: float) -> Child:
        return start_child(lambda: self._write_confined(path, text.encode()), timeout_s)

    def start_unbind(self, bdf: Bdf, driver: str, timeout_s: float) -> Child:
        return self._start_write(self._driver_dir(driver) / "unbind", str(bdf), timeout_s)

    def start_bind(self, bdf: Bdf, driver: str, timeout_s: float) -> Child:
        """probe() runs synchronously in the write, and may wait on the same locks a hung
        remove() holds."""
        return self._start_write(self._driver_dir(driver) / "bind", str(bdf), timeout_s)

    def start_set_driver_override(self, bdf: Bdf, value: str | None, timeout_s: float) -> Child:
        """driver_set_override() takes the device lock, which a hung remove(), probe() or bus
        reset of ours may still hold."""
        path = self.device_dir(bdf) / "driver_override"
        return self._start_write(path, value or "\n", timeout_s)

    def start_write_command(self, bdf: Bdf, value: int, timeout_s: float) -> Child:
        """A config write waits while a reset holds the function (pci_dev_lock() takes
        pci_cfg_access_lock(); pci_user_write_config_word() sleeps in pci_wait_cfg())."""
        path, data = self.device_dir(bdf) / "config", value.to_bytes(2, "little")
        return start_child(lambda: self._write_confined(path, data, PCI_COMMAND), timeout_s)

    def start_enable(self, bdf: Bdf, timeout_s: float) -> Child:
        """enable_store() takes the device lock."""
        return self._start_write(self.device_dir(bdf) / "enable", "1", timeout_s)

    def start_set_sriov_numvfs(self, bdf: Bdf, numvfs: int, timeout_s: float) -> Child:
        """sriov_numvfs_store() creates the VFs and probes their drivers before it returns."""
        return self._start_write(self.device_dir(bdf) / "sriov_numvfs", str(numvfs), timeout_s)

    def start_reset_subordinate(self, bridge: Bdf, timeout_s: float) -> Child:
        return self._start_write(self.device_dir(bridge) / "reset_subordinate", "1", timeout_s)

    def start_function_bus_reset(self, bdf: Bdf, timeout_s: float) -> Child:
        """`reset` with reset_method `bus`: pci_parent_bus_reset() saves and restores the
        function's config around a secondary bus reset of its bridge."""
        directory = self.device_dir(bdf)
        methods = self.read_attribute(bdf, "reset_method") or "default"

        def reset() -> None:
            self._write_confined(directory / "reset_method", b"bus")
            try:
                self._write_confined(directory / "reset", b"1")
            finally:
                with contextlib.suppress(OSError):
                    self._write_confined(directory / "reset_method", methods.encode())

        return start_child(reset, timeout_s)

    def write_enable(self, bdf: Bdf, enabled: bool) -> None:
        self._write(self.device_dir(bdf) / "enable", "1" if enabled else "0")
