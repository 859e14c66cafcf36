"""A simulated kernel: a sysfs tree under a temporary directory that reacts to writes.

The tree is laid out as the kernel lays it out (and as umockdev replays it), so discovery can
run on it under umockdev's preload. Writes go through `SimKernel.write`, the `SysfsWriter` the
code under test uses, and change the tree the way KERNEL-FACTS.md says the kernel does:
- unbind removes the `driver` link and may leave bus master on (pci_device_remove() never
  clears it; only drivers with managed enable do, through pci_disable_device());
- unbinding a PF removes its VFs;
- `bind` honours driver_override (pci_match_device()), and probe sets bus master;
- config writes land, or fail with EPERM under integrity lockdown;
- `enable` shows the enable count; ← 0 drops it by one and clears bus master when it reaches
  0; EBUSY with a driver, EIO at 0;
- `sriov_numvfs` recreates the VFs a PF unbind removed, and their drivers probe.
Faults: a remove() that hangs, a write that fails with an errno, config reading 0xffff, a
function that vanishes. All state lives in files, because unbind runs in a forked child.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.kernel import Kernel
from petitkexec.model import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_COMMAND_MASTER,
    PciFunction,
    Topology,
)

MASTER = PCI_COMMAND_MASTER


@dataclass(frozen=True)
class SimFunction:
    """One function to build, and how its driver behaves."""

    bdf: str
    vendor: int = 0x8086
    device: int = 0x10D3
    class_code: int = 0x020000
    bridge: bool = False
    multifunction: bool = False
    parent: str | None = None
    physfn: str | None = None
    driver: str | None = None
    can_unbind: bool = True  # False: the driver sets suppress_bind_attrs
    command: int = 0x0006  # memory space + bus master
    enable_count: int = 1  # pci_enable_device() calls not yet balanced by a disable
    reset_methods: tuple[str, ...] = ()
    reset_subordinate: bool = False
    # behaviour of the driver's remove()
    remove_clears_master: bool = False  # pcim_enable_device(): pci_disable_device() on unbind
    remove_hangs: bool = False  # e.g. p9_virtio_remove waiting for its users
    probe_hangs: bool = False  # a rebind's probe() waiting on a lock that is never released
    remove_seconds: float = 0.0  # how long remove() takes (NVMe shutdown, NIC firmware)
    reset_seconds: float = 0.0  # how long a secondary bus reset below this bridge takes
    # A VF recreated through sriov_numvfs with its PF's sriov_drivers_autoprobe on is probed
    # by the first matching driver (the PF's VF driver), not necessarily the one it had.
    autoprobe_driver: str | None = None

    @property
    def address(self) -> Bdf:
        return Bdf.parse(self.bdf)


def root_port(bdf: str, parent: str | None = None, **kwargs: object) -> SimFunction:
    """A root port bound to pcieport, as q35 shows it (COMMAND 0x0507)."""
    defaults: dict[str, object] = dict(
        vendor=0x1B36,
        device=0x000C,
        class_code=0x060400,
        bridge=True,
        driver="pcieport",
        command=0x0507,
        remove_clears_master=True,
    )
    defaults.update(kwargs)
    return SimFunction(bdf, parent=parent, **defaults)  # type: ignore[arg-type]


@dataclass
class SimKernel:
    root: Path  # plays /sys
    functions: list[SimFunction]
    lockdown: str = "none"
    kexec_loaded: bool = True
    failing_writes: dict[tuple[str, str], int] = field(default_factory=dict)
    # Writes that wait forever, as one waiting on a device_lock a stuck remove() holds.
    hanging_writes: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_bdf = {f.bdf: f for f in self.functions}
        self.state = self.root.parent / "simstate"
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "writes.log").touch()
        for function in self.functions:
            self._build(function)
        security = self.root / "kernel" / "security"
        security.mkdir(parents=True, exist_ok=True)
        self.set_lockdown(self.lockdown)
        (self.root / "kernel" / "kexec_loaded").write_text("1\n" if self.kexec_loaded else "0\n")

    @property
    def kernel(self) -> Kernel:
        return Kernel(self.root, self, sleep=lambda _seconds: None)

    # -- building ----------------------------------------------------------------------------

    def device_dir(self, bdf: str) -> Path:
        return self.root / "bus" / "pci" / "devices" / bdf

    def _physical_dir(self, function: SimFunction) -> Path:
        address = function.address
        host = self.root / "devices" / f"pci{address.domain:04x}:{address.bus:02x}"
        if function.parent is None:
            return host / function.bdf
        return self._physical_dir(self.by_bdf[function.parent]) / function.bdf

    def _build(self, function: SimFunction) -> None:
        directory = self._physical_dir(function)
        directory.mkdir(parents=True, exist_ok=True)
        config = bytearray(256)
        # VFs read 0xffff as vendor/device in config; sysfs `vendor` comes from the PF.
        ids = (
            b"\xff\xff\xff\xff"
            if function.physfn
            else (function.vendor.to_bytes(2, "little") + function.device.to_bytes(2, "little"))
        )
        config[0:4] = ids
        config[4:6] = function.command.to_bytes(2, "little")
        config[9:12] = function.class_code.to_bytes(3, "little")
        config[0x0E] = (0x80 if function.multifunction else 0) | (1 if function.bridge else 0)
        (directory / "config").write_bytes(bytes(config))
        for name, value in (
            ("vendor", f"0x{function.vendor:04x}"),
            ("device", f"0x{function.device:04x}"),
            ("class", f"0x{function.class_code:06x}"),
            ("driver_override", "(null)"),
        ):
            (directory / name).write_text(value + "\n")
        if self.vfs_of(function.bdf):
            (directory / "sriov_numvfs").write_text(f"{len(self.vfs_of(function.bdf))}\n")
            (directory / "sriov_drivers_autoprobe").write_text("1\n")
        if function.reset_methods:
            (directory / "reset_method").write_text(" ".join(function.reset_methods) + "\n")
            (directory / "reset").write_text("")
        if function.reset_subordinate:
            (directory / "reset_subordinate").write_text("")
        self._link(directory / "subsystem", self.root / "bus" / "pci")
        (self.root / "bus" / "pci" / "drivers").mkdir(parents=True, exist_ok=True)
        if function.physfn is not None:
            self._link(directory / "physfn", self._physical_dir(self.by_bdf[function.physfn]))
            pf_dir = self._physical_dir(self.by_bdf[function.physfn])
            index = [vf.bdf for vf in self.vfs_of(function.physfn)].index(function.bdf)
            self._link(pf_dir / f"virtfn{index}", directory)
        devices = self.root / "bus" / "pci" / "devices"
        devices.mkdir(parents=True, exist_ok=True)
        self._link(devices / function.bdf, directory)
        self._set_enable_count(function.bdf, function.enable_count)
        self._write_uevent(function, function.driver)
        if function.driver is not None:
            self._attach(function.bdf, function.driver, can_unbind=function.can_unbind)

    def _write_uevent(self, function: SimFunction, driver: str | None) -> None:
        lines = [
            f"PCI_CLASS={function.class_code:X}",
            f"PCI_ID={function.vendor:04X}:{function.device:04X}",
            f"PCI_SLOT_NAME={function.bdf}",
            f"MODALIAS=pci:v{function.vendor:08X}d{function.device:08X}",
        ]
        if driver is not None:
            lines.insert(0, f"DRIVER={driver}")
        (self._physical_dir(function) / "uevent").write_text("\n".join(lines) + "\n")

    def _driver_dir(self, driver: str, can_unbind: bool = True) -> Path:
        directory = self.root / "bus" / "pci" / "drivers" / driver
        if not directory.exists():
            directory.mkdir(parents=True)
            if can_unbind:
                (directory / "bind").write_text("")
                (directory / "unbind").write_text("")
        return directory

    def _attach(self, bdf: str, driver: str, *, can_unbind: bool = True) -> None:
        function = self.by_bdf[bdf]
        directory = self._physical_dir(function)
        driver_dir = self._driver_dir(driver, can_unbind)
        self._link(directory / "driver", driver_dir)
        self._link(driver_dir / bdf, directory)
        self._write_uevent(function, driver)

    @staticmethod
    def _link(link: Path, target: Path) -> None:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))

    # -- what a test looks at ----------------------------------------------------------------

    def topology(self) -> Topology:
        """What discovery should find (tests/test_discovery.py checks it against pyudev)."""
        return Topology.from_functions(
            PciFunction(
                bdf=f.address,
                vendor=f.vendor,
                device=f.device,
                class_code=f.class_code,
                header_type=(0x80 if f.multifunction else 0) | (1 if f.bridge else 0),
                command=self.command_of(f.bdf),
                driver=self.driver_of(f.bdf),
                driver_can_unbind=self.driver_of(f.bdf) is not None and f.can_unbind,
                driver_override=None,
                parent=_optional(f.parent),
                physfn=_optional(f.physfn),
                enabled=self._enable_count(f.bdf) > 0,
                reset_methods=f.reset_methods,
                has_reset=bool(f.reset_methods),
                has_reset_subordinate=f.reset_subordinate,
            )
            for f in self.functions
            if self.exists(f.bdf)
        )

    def driver_of(self, bdf: str) -> str | None:
        return self.kernel.driver(Bdf.parse(bdf))

    def command_of(self, bdf: str) -> int:
        value = self.kernel.read_command(Bdf.parse(bdf))
        assert value is not None, bdf
        return value

    def bus_master_on(self, bdf: str) -> bool:
        return bool(self.command_of(bdf) & MASTER)

    def attribute(self, bdf: str, name: str) -> str:
        return (self.device_dir(bdf) / name).read_text().strip()

    def writes(self) -> list[dict[str, str]]:
        text = (self.state / "writes.log").read_text()
        return [json.loads(line) for line in text.splitlines()]

    def exists(self, bdf: str) -> bool:
        return self.device_dir(bdf).exists()

    def vfs_of(self, bdf: str) -> list[SimFunction]:
        return [f for f in self.functions if f.physfn == bdf]

    # -- faults ------------------------------------------------------------------------------

    def set_lockdown(self, level: str) -> None:
        levels = ["none", "integrity", "confidentiality"]
        text = " ".join(f"[{name}]" if name == level else name for name in levels)
        (self.root / "kernel" / "security" / "lockdown").write_text(text + "\n")
        self.lockdown = level

    def fail_write(self, bdf: str, attribute: str, code: int) -> None:
        self.failing_writes[(bdf, attribute)] = code

    def hang_write(self, bdf: str, attribute: str) -> None:
        self.hanging_writes.add((bdf, attribute))

    def late_probe(self, bdf: str, driver: str, *, under_way: bool = False) -> bool:
        """udev's modprobe or a deferred probe reaching an unbound function: it binds unless
        driver_override names another driver (pci_match_device()), and probe turns bus
        mastering on. `under_way`: the probe had matched before the override was written."""
        override = self.attribute(bdf, "driver_override")
        if self.driver_of(bdf) is not None or (
            override not in ("(null)", driver) and not under_way
        ):
            return False
        self._attach(bdf, driver)
        self._set_command(bdf, self.command_of(bdf) | MASTER)
        return True

    def make_config_read_ffff(self, bdf: str) -> None:
        """A surprise-removed, link-down or EEH-frozen function."""
        (self.device_dir(bdf) / "config").write_bytes(b"\xff" * 256)

    def vanish(self, bdf: str) -> None:
        """Hot removal: the function's directory and links are gone."""
        directory = self.device_dir(bdf).resolve()
        driver = self.driver_of(bdf)
        if driver is not None:
            (self.root / "bus" / "pci" / "drivers" / driver / bdf).unlink(missing_ok=True)
        self.device_dir(bdf).unlink()
        for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
            path.unlink() if (path.is_symlink() or path.is_file()) else path.rmdir()
        directory.rmdir()

    # -- the kernel's reactions (SysfsWriter) ------------------------------------------------

    def write(self, path: Path, data: bytes, offset: int | None = None) -> None:
        relative = path.relative_to(self.root)
        text = data.decode(errors="replace").strip()
        with (self.state / "writes.log").open("a") as log:
            log.write(
                json.dumps(
                    {
                        "path": str(relative),
                        "data": data.hex() if relative.name == "config" else text,
                        "offset": offset,
                    }
                )
                + "\n"
            )
        if relative.parts[:3] == ("bus", "pci", "drivers"):
            driver, action = relative.parts[3], relative.parts[4]
            self._check_fault(text, action)
            if action == "unbind":
                return self._unbind(text, driver)
            if action == "bind":
                return self._bind(text, driver)
            raise OSError(errno.EACCES, "not writable")
        bdf, attribute = relative.parts[3], relative.parts[4]
        if not self.device_dir(bdf).exists():
            raise OSError(errno.ENOENT, "No such file or directory")
        self._check_fault(bdf, attribute)
        handler = getattr(self, f"_write_{attribute}", None)
        if handler is None:
            raise OSError(errno.EACCES, f"{attribute} is not writable")
        handler(bdf, text, data, offset)

    def _check_fault(self, bdf: str, attribute: str) -> None:
        if (bdf, attribute) in self.hanging_writes:
            time.sleep(3600)  # killed by the caller's deadline
        code = self.failing_writes.get((bdf, attribute))
        if code is not None:
            raise OSError(code, os.strerror(code))

    def _unbind(self, bdf: str, driver: str) -> None:
        if self.driver_of(bdf) != driver:
            raise OSError(errno.ENODEV, "No such device")  # driver_unbind()
        function = self.by_bdf[bdf]
        if function.remove_hangs:
            time.sleep(3600)  # killed by the caller's deadline
        began = time.monotonic()
        time.sleep(function.remove_seconds)
        self._log_event(bdf, f"removed {began} {time.monotonic()}")
        for vf in self.vfs_of(bdf):
            if self.exists(vf.bdf):
                self.vanish(vf.bdf)  # the PF's remove() disables SR-IOV (pci_disable_sriov)
        if self.vfs_of(bdf):
            (self._physical_dir(function) / "sriov_numvfs").write_text("0\n")
        directory = self._physical_dir(function)
        (directory / "driver").unlink()
        (self.root / "bus" / "pci" / "drivers" / driver / bdf).unlink()
        self._write_uevent(function, None)
        if function.remove_clears_master:
            self._disable(bdf)

    def _bind(self, bdf: str, driver: str) -> None:
        override = self.attribute(bdf, "driver_override")
        if self.driver_of(bdf) is not None or override not in ("(null)", driver):
            raise OSError(errno.ENODEV, "No such device")
        physfn = self.by_bdf[bdf].physfn
        # pci_device_can_probe(): a VF without driver_override probes only while its PF's
        # sriov_drivers_autoprobe is on.
        if (
            physfn
            and override == "(null)"
            and self.attribute(physfn, "sriov_drivers_autoprobe") == "0"
        ):
            raise OSError(errno.ENODEV, "No such device")
        if self.by_bdf[bdf].probe_hangs:
            time.sleep(3600)  # killed by the caller's deadline
        self._attach(bdf, driver)
        self._set_command(bdf, self.command_of(bdf) | MASTER)  # probe: pci_set_master()
        self._set_enable_count(bdf, self._enable_count(bdf) + 1)

    def _write_driver_override(
        self, bdf: str, text: str, _data: bytes, _offset: int | None
    ) -> None:
        (self.device_dir(bdf) / "driver_override").write_text((text or "(null)") + "\n")

    def _write_config(self, bdf: str, _text: str, data: bytes, offset: int | None) -> None:
        if self.lockdown in ("integrity", "confidentiality"):
            raise OSError(errno.EPERM, "Operation not permitted")  # security_locked_down()
        config = bytearray((self.device_dir(bdf) / "config").read_bytes())
        start = offset or 0
        config[start : start + len(data)] = data
        (self.device_dir(bdf) / "config").write_bytes(bytes(config))
        if start == PCI_BRIDGE_CONTROL and data[0] & PCI_BRIDGE_CTL_BUS_RESET:
            self._log_event(bdf, "raw-sbr")

    def _write_enable(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        if self.driver_of(bdf) is not None:
            raise OSError(errno.EBUSY, "Device or resource busy")
        count = self._enable_count(bdf)
        if text == "1":
            self._set_enable_count(bdf, count + 1)
        elif count == 0:
            raise OSError(errno.EIO, "Input/output error")
        else:
            self._set_enable_count(bdf, count - 1)
            if count == 1:
                self._disable(bdf)

    def _write_sriov_numvfs(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        """sriov_numvfs_store(): needs a bound PF driver with sriov_configure; creating VFs
        probes their drivers before the write returns (sriov_drivers_autoprobe)."""
        if self.driver_of(bdf) is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        wanted, vfs = int(text), self.vfs_of(bdf)
        if wanted > len(vfs):
            raise OSError(errno.ERANGE, "Numerical result out of range")
        current = int(self.attribute(bdf, "sriov_numvfs"))
        if current and wanted and current != wanted:
            raise OSError(errno.EBUSY, "Device or resource busy")  # disable first
        autoprobe = self.attribute(bdf, "sriov_drivers_autoprobe") == "1"
        for vf in vfs[:wanted]:
            if not self.exists(vf.bdf):
                # pci_iov_add_virtfn(): probed now only if the PF's autoprobe is on
                # (pci_device_can_probe()), by the first driver that matches.
                probed = (vf.autoprobe_driver or vf.driver) if autoprobe else None
                self._build(dataclasses.replace(vf, driver=probed))
        (self.device_dir(bdf) / "sriov_numvfs").write_text(f"{wanted}\n")

    def _write_sriov_drivers_autoprobe(
        self, bdf: str, text: str, _data: bytes, _offset: int | None
    ) -> None:
        if text not in ("0", "1"):
            raise OSError(errno.EINVAL, "Invalid argument")  # kstrtobool()
        (self.device_dir(bdf) / "sriov_drivers_autoprobe").write_text(f"{text}\n")

    def _write_reset_method(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        methods = self.by_bdf[bdf].reset_methods if text == "default" else tuple(text.split())
        if not set(methods) <= set(self.by_bdf[bdf].reset_methods):
            raise OSError(errno.EINVAL, "Invalid argument")
        (self.device_dir(bdf) / "reset_method").write_text(" ".join(methods) + "\n")

    def _write_reset(self, bdf: str, _text: str, _data: bytes, _offset: int | None) -> None:
        # pci_reset_function(): save config, reset with the first method, restore config.
        self._log_event(bdf, "reset:" + self.attribute(bdf, "reset_method").split()[0])

    def _write_reset_subordinate(
        self, bdf: str, _text: str, _data: bytes, _offset: int | None
    ) -> None:
        began = time.monotonic()
        time.sleep(self.by_bdf[bdf].reset_seconds)
        self._log_event(bdf, f"reset_subordinate {began} {time.monotonic()}")

    def _log_event(self, bdf: str, event: str) -> None:
        with (self.state / "writes.log").open("a") as log:
            log.write(json.dumps({"path": f"event/{bdf}", "data": event, "offset": None}) + "\n")

    def remove_spans(self) -> dict[str, tuple[float, float]]:
        """When each remove() ran, by monotonic clock: (start, end)."""
        spans = {}
        for event in self.events():
            bdf, word, *times = event.split()
            if word == "removed":
                spans[bdf] = (float(times[0]), float(times[1]))
        return spans

    def events(self) -> list[str]:
        return [
            f"{w['path'][6:]} {w['data']}" for w in self.writes() if w["path"].startswith("event/")
        ]

    # -- helpers -----------------------------------------------------------------------------

    def _disable(self, bdf: str) -> None:
        """do_pci_disable_device(): clear bus master."""
        self._set_command(bdf, self.command_of(bdf) & ~MASTER)
        self._set_enable_count(bdf, 0)

    def _set_command(self, bdf: str, value: int) -> None:
        config = bytearray((self.device_dir(bdf) / "config").read_bytes())
        config[4:6] = value.to_bytes(2, "little")
        (self.device_dir(bdf) / "config").write_bytes(bytes(config))

    def _enable_count(self, bdf: str) -> int:
        return int((self.state / f"enable-{bdf}").read_text())

    def _set_enable_count(self, bdf: str, count: int) -> None:
        (self.state / f"enable-{bdf}").write_text(str(count))
        if self.device_dir(bdf).exists():
            # enable_show() prints atomic_read(&enable_cnt): a count, not a flag.
            (self.device_dir(bdf) / "enable").write_text(f"{count}\n")


def _optional(text: str | None) -> Bdf | None:
    return None if text is None else Bdf.parse(text)
