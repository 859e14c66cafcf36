"""A simulated kernel: a sysfs tree under a temporary directory that reacts to writes.

The tree is laid out as the kernel lays it out (and as umockdev replays it), so discovery can
run on it under umockdev's preload. Writes go through `SimKernel.write`, the `SysfsWriter` the
code under test uses, and change the tree the way KERNEL-FACTS.md says the kernel does:
- a write to a file that does not exist (no `unbind` for a suppress_bind_attrs driver, no
  `reset_subordinate` on an older bridge) fails with ENOENT;
- unbind holds the device lock while remove() runs and cannot be interrupted (tests/simlocks.py);
  it removes the `driver` link and may leave bus master on (pci_device_remove() never clears
  it; drivers with managed enable call pci_disable_device() once: the count goes down by one,
  and bus master is cleared only at 0);
- unbinding a PF removes its VFs; `sriov_numvfs` ← n creates them and probes their drivers
  when `sriov_drivers_autoprobe` is 1, ← 0 removes them;
- `bind` honours driver_override (pci_match_device()), and probe sets bus master;
- "udev" binds a function's driver again after an unbind when its driver_override allows it
  (`autoprobe`), as does a late (deferred, asynchronous) probe;
- config writes land, fail with EPERM under integrity lockdown, or vanish on a dead link;
- `enable` shows the enable count; ← 0 calls pci_disable_device() once; EBUSY with a driver,
  EIO at 0;
- secondary bus resets through the kernel save and restore the config of everything below
  (pci_reset_bus()); a raw one through Bridge Control does not;
- `kernel.sleep` advances a simulated clock and is recorded, so timings can be asserted.
Faults: a remove() that hangs, a write that fails with an errno, config reading 0xffff, a
function that vanishes, config writes dropped, bus master switched on again, an enable count
that does not go down. All state lives in files, because unbind runs in a forked child.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.kernel import Kernel
from petitkexec.model import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PciFunction,
    Topology,
)
from tests import simlocks

MASTER = PCI_COMMAND_MASTER
EPROBE_DEFER = 517  # include/linux/errno.h: what a bind answers when probe() defers
HUNG_S = 3600.0  # a remove() or probe() that hangs: until the test releases it, or this long
SBR_MIN_HOLD_S = 0.001  # PCIe Trst: a secondary bus reset held shorter may not reset anything


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
    remove_hangs: bool = False  # e.g. p9_virtio_remove waiting for its users (until released)
    probe_hangs: bool = False  # a rebind's probe() waiting on a lock that is never released
    probe_defers: bool = False  # probe() answers -EPROBE_DEFER until fire_deferred_probes()
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
    # udev (or driverctl, a module load) binding a function whose driver was unbound again,
    # as far as its driver_override lets it: why petitkexec writes `none` before unbinding.
    autoprobe: bool = True

    def __post_init__(self) -> None:
        self.by_bdf = {f.bdf: f for f in self.functions}
        self.state = self.root.parent / "simstate"
        self.state.mkdir(parents=True, exist_ok=True)
        simlocks.STATE_DIRS.append(self.state)
        self.main_pid = os.getpid()
        self.clock = 0.0  # seconds slept through `kernel.sleep`
        self.sleeps: list[float] = []
        self.raw_sbr_holds: dict[str, float] = {}  # bridge: how long Bridge Control held SBR
        self._raw_sbr_asserted: dict[str, tuple[float, dict[str, bytes]]] = {}
        (self.state / "writes.log").touch()
        for function in self.functions:
            self._build(function)
        security = self.root / "kernel" / "security"
        security.mkdir(parents=True, exist_ok=True)
        self.set_lockdown(self.lockdown)
        (self.root / "kernel" / "kexec_loaded").write_text("1\n" if self.kexec_loaded else "0\n")

    @property
    def kernel(self) -> Kernel:
        return Kernel(self.root, self, sleep=self.sleep)

    def sleep(self, seconds: float) -> None:
        """What the code under test asks to wait: recorded, in order with the writes."""
        self.clock += seconds
        self.sleeps.append(seconds)
        self._log({"path": "sleep", "data": f"{seconds:g}", "offset": None})

    # -- building ----------------------------------------------------------------------------

    def device_dir(self, bdf: str) -> Path:
        return self.root / "bus" / "pci" / "devices" / bdf

    def _physical_dir(self, function: SimFunction) -> Path:
        address = function.address
        host = self.root / "devices" / f"pci{address.domain:04x}:{address.bus:02x}"
        if function.parent is None:
            return host / function.bdf
        return self._physical_dir(self.by_bdf[function.parent]) / function.bdf

    def _build(self, function: SimFunction, probe: bool = True) -> None:
        directory = self._physical_dir(function)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config").write_bytes(self._config_at_reset(function))
        for name, value in (
            ("vendor", f"0x{function.vendor:04x}"),
            ("device", f"0x{function.device:04x}"),
            ("class", f"0x{function.class_code:06x}"),
            ("driver_override", "(null)"),
        ):
            (directory / name).write_text(value + "\n")
        if self.vfs_of(function.bdf):
            (directory / "sriov_numvfs").write_text(f"{len(self.vfs_of(function.bdf))}\n")
            (directory / "sriov_totalvfs").write_text(f"{len(self.vfs_of(function.bdf))}\n")
            (directory / "sriov_drivers_autoprobe").write_text("1\n")
        if function.reset_methods:
            (directory / "reset_method").write_text(" ".join(function.reset_methods) + "\n")
            (directory / "reset").write_text("")
        if function.reset_subordinate:
            (directory / "reset_subordinate").write_text("")
        (directory / "remove").write_text("")
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
        self._write_uevent(function, None)
        if function.driver is not None and probe:
            self._attach(function.bdf, function.driver, can_unbind=function.can_unbind)

    @staticmethod
    def _config_at_reset(function: SimFunction) -> bytes:
        """Config space as built; after a reset the same, with COMMAND as the function's own
        reset value is set over it."""
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
        return bytes(config)

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

    def enable_count(self, bdf: str) -> int:
        return self._enable_count(bdf)

    def writes(self) -> list[dict[str, str]]:
        """Every write, event and sleep, in order (sleeps have the path `sleep`)."""
        text = (self.state / "writes.log").read_text()
        return [json.loads(line) for line in text.splitlines()]

    def exists(self, bdf: str) -> bool:
        return self.device_dir(bdf).exists()

    def vfs_of(self, bdf: str) -> list[SimFunction]:
        return [f for f in self.functions if f.physfn == bdf]

    def below(self, bridge: str) -> list[str]:
        """Every function below a bridge that exists now, VFs included."""
        found, pending = [], [f.bdf for f in self.functions if f.parent == bridge]
        while pending:
            bdf = pending.pop(0)
            found.append(bdf)
            pending += [f.bdf for f in self.functions if f.parent == bdf]
        return [bdf for bdf in found if self.exists(bdf)]

    def is_locked(self, bdf: str) -> bool:
        """Whether a write (a remove() that has not returned) holds the device lock."""
        return simlocks.is_locked(self.state, bdf)

    # -- faults ------------------------------------------------------------------------------

    def set_lockdown(self, level: str) -> None:
        levels = ["none", "integrity", "confidentiality"]
        text = " ".join(f"[{name}]" if name == level else name for name in levels)
        (self.root / "kernel" / "security" / "lockdown").write_text(text + "\n")
        self.lockdown = level

    def fail_write(self, bdf: str, attribute: str, code: int) -> None:
        self.failing_writes[(bdf, attribute)] = code

    def make_config_read_ffff(self, bdf: str) -> None:
        """A surprise-removed, link-down or EEH-frozen function: reads are all ones and writes
        are dropped (the platform accessors swallow the error; pci_write_config() returns the
        byte count all the same)."""
        (self.device_dir(bdf) / "config").write_bytes(b"\xff" * 256)
        self._set_fault("dead", bdf)

    def drop_config_writes(self, bdf: str) -> None:
        """Config writes that never reach the function, while reads still answer."""
        self._set_fault("drops-writes", bdf)

    def turn_bus_master_back_on(self, bdf: str, when: str = "write") -> None:
        """A driver or firmware that sets bus master again: right after any config write
        (`write`), or when the config is restored after a secondary bus reset (`reset`)."""
        assert when in ("write", "reset"), when
        self._set_fault(f"master-back-after-{when}", bdf)

    def hold_enable_count(self, bdf: str) -> None:
        """`enable` ← 0 answers success while the count stays (someone enables it again)."""
        self._set_fault("holds-enable", bdf)

    def release(self, bdf: str) -> None:
        """A hung remove() or probe() of this function returns now."""
        simlocks.release(self.state, bdf)

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

    def _set_fault(self, name: str, bdf: str) -> None:
        (self.state / f"{name}-{bdf}").touch()

    def _has_fault(self, name: str, bdf: str) -> bool:
        return (self.state / f"{name}-{bdf}").exists()

    # -- what happens without a write: probes that come late ---------------------------------

    def probe_under_way(self, bdf: str, driver: str) -> None:
        """A probe that had matched (pci_match_device()) before driver_override was written,
        finishing now: driver_override no longer stops it."""
        with self._device_lock(bdf):
            self._probe(bdf, driver)

    def late_probe(self, bdf: str, driver: str | None = None) -> str | None:
        """A probe the test process did not ask for (udev after an unbind, a deferred or
        asynchronous probe, a module load): binds the function's driver, or the one its
        driver_override names, unless the override is `none` (pci_match_device()).
        Returns the driver bound, if any."""
        function = self.by_bdf[bdf]
        if function.probe_hangs or self._defers(bdf):
            return None
        # __device_attach() holds device_lock while pci_match_device() reads driver_override:
        # an override write (driver_set_override(), under the same lock) is either wholly
        # before the match or wholly after it, never read half written.
        with self._device_lock(bdf):
            if not self.exists(bdf) or self.driver_of(bdf) is not None:
                return None
            override = self.attribute(bdf, "driver_override")
            wanted = driver or function.driver
            if override != "(null)":  # the override decides which driver may bind, if any
                wanted = override if driver in (None, override) else None
            # An override names a driver; a name no registered driver has matches nothing
            # (`none` is the usual such name: driver_match_device() fails for every driver).
            if wanted is None or not (self.root / "bus" / "pci" / "drivers" / wanted).is_dir():
                return None
            self._probe(bdf, wanted)
        self._log_event(bdf, f"probed {wanted}")
        return wanted

    def load_driver(self, driver: str) -> list[str]:
        """modprobe: the driver registers (driver_register() -> driver_attach()) and binds
        each unbound function it matches, its own or one whose driver_override names it.
        Returns the functions it bound."""
        self._driver_dir(driver)
        bound = []
        for bdf, function in self.by_bdf.items():
            named = self.exists(bdf) and self.attribute(bdf, "driver_override") == driver
            if (function.driver == driver or named) and self.late_probe(bdf, driver) == driver:
                bound.append(bdf)
        return bound

    def fire_deferred_probes(self) -> list[str]:
        """driver_deferred_probe_trigger(): the probes that deferred run again, and succeed."""
        bound = []
        for marker in sorted(self.state.glob("deferred-*")):
            bdf, driver = marker.name.removeprefix("deferred-"), marker.read_text()
            marker.unlink()
            self._set_fault("probe-resolved", bdf)  # what it waited for has arrived
            if self.late_probe(bdf, driver) is not None:
                bound.append(bdf)
        return bound

    def _defers(self, bdf: str) -> bool:
        return self.by_bdf[bdf].probe_defers and not self._has_fault("probe-resolved", bdf)

    # -- the kernel's reactions (SysfsWriter) ------------------------------------------------

    def write(self, path: Path, data: bytes, offset: int | None = None) -> None:
        relative = path.relative_to(self.root)
        text = data.decode(errors="replace").strip()
        self._log(
            {
                "path": str(relative),
                "data": data.hex() if relative.name == "config" else text,
                "offset": offset,
            }
        )
        if not path.exists():
            # No such attribute: a driver with suppress_bind_attrs has no bind/unbind, an
            # older bridge no reset_subordinate, a function without SR-IOV no sriov_numvfs.
            raise OSError(errno.ENOENT, "No such file or directory")
        with simlocks.uninterruptible(self.state):
            self._react(relative, text, data, offset)

    def _react(self, relative: Path, text: str, data: bytes, offset: int | None) -> None:
        if relative.parts[:3] == ("bus", "pci", "drivers"):
            driver, action = relative.parts[3], relative.parts[4]
            self._check_fault(text, action)
            if action == "unbind":
                return self._unbind(text, driver)
            if action == "bind":
                return self._bind(text, driver)
            raise OSError(errno.EACCES, "not writable")
        bdf, attribute = relative.parts[3], relative.parts[4]
        self._check_fault(bdf, attribute)
        handler = getattr(self, f"_write_{attribute}", None)
        if handler is None:
            raise OSError(errno.EACCES, f"{attribute} is not writable")
        handler(bdf, text, data, offset)

    def _check_fault(self, bdf: str, attribute: str) -> None:
        code = self.failing_writes.get((bdf, attribute))
        if code is not None:
            raise OSError(code, os.strerror(code))

    @contextmanager
    def _device_lock(self, bdf: str) -> Iterator[None]:
        with simlocks.device_lock(self.state, bdf, self.main_pid):
            yield

    @contextmanager
    def _cfg_access(self, bdf: str) -> Iterator[None]:
        """pci_cfg_access_lock(): a reset blocks userspace config access to the function."""
        with simlocks.device_lock(self.state, f"cfg-{bdf}", self.main_pid):
            yield

    @contextmanager
    def _pci_dev_lock(self, bdf: str) -> Iterator[None]:
        """pci_dev_lock(): config access, then the device lock."""
        with self._cfg_access(bdf), self._device_lock(bdf):
            yield

    def _unbind(self, bdf: str, driver: str) -> None:
        # unbind_store(): the driver is compared before device_release_driver_internal()
        # takes the lock; a second unbind waits for the first and then finds nothing to do.
        if self.driver_of(bdf) != driver:
            raise OSError(errno.ENODEV, "No such device")
        with self._device_lock(bdf):
            if self.driver_of(bdf) != driver:
                return
            self._remove(bdf, driver)
        if self.autoprobe:
            self.late_probe(bdf)  # udev sees the unbind uevent

    def _remove(self, bdf: str, driver: str) -> None:
        """pci_device_remove(): the driver's remove(), then SR-IOV off, with the lock held."""
        function = self.by_bdf[bdf]
        began = time.monotonic()
        simlocks.block(
            self.state, bdf, HUNG_S if function.remove_hangs else function.remove_seconds
        )
        self._log_event(bdf, f"removed {began} {time.monotonic()}")
        self._remove_vfs(bdf)  # the PF's remove() disables SR-IOV (pci_disable_sriov)
        directory = self._physical_dir(function)
        (directory / "driver").unlink()
        (self.root / "bus" / "pci" / "drivers" / driver / bdf).unlink()
        self._write_uevent(function, None)
        if function.remove_clears_master:
            self._pci_disable_device(bdf)  # devres: pcim_enable_device()'s release

    def _remove_vfs(self, pf: str) -> None:
        # Each VF is deleted under its own device lock (device_del → device_release_driver).
        for vf in self.vfs_of(pf):
            if self.exists(vf.bdf):
                with self._device_lock(vf.bdf):
                    if self.exists(vf.bdf):
                        self.vanish(vf.bdf)
        if self.vfs_of(pf):
            (self._physical_dir(self.by_bdf[pf]) / "sriov_numvfs").write_text("0\n")

    def _bind(self, bdf: str, driver: str) -> None:
        if not self.exists(bdf):
            raise OSError(errno.ENODEV, "No such device")
        override = self.attribute(bdf, "driver_override")
        if override not in ("(null)", driver):
            raise OSError(errno.ENODEV, "No such device")  # driver_match_device() failed
        physfn = self.by_bdf[bdf].physfn
        if (
            physfn
            and override == "(null)"
            and self.attribute(physfn, "sriov_drivers_autoprobe") == "0"
        ):
            # pci_device_can_probe(): a VF without driver_override probes only while its
            # PF's sriov_drivers_autoprobe is on.
            raise OSError(errno.ENODEV, "No such device")
        with self._device_lock(bdf):
            if self.driver_of(bdf) is not None:
                raise OSError(errno.EBUSY, "Device or resource busy")  # __driver_probe_device()
            function = self.by_bdf[bdf]
            if function.probe_hangs:
                simlocks.block(self.state, bdf, HUNG_S)
            if self._defers(bdf):
                (self.state / f"deferred-{bdf}").write_text(driver)  # driver_deferred_probe_add()
                raise OSError(EPROBE_DEFER, "Unknown error 517")
            self._probe(bdf, driver)

    def _probe(self, bdf: str, driver: str) -> None:
        self._attach(bdf, driver)
        self._set_enable_count(bdf, self._enable_count(bdf) + 1)  # pci_enable_device()
        self._set_command(bdf, self.command_of(bdf) | MASTER)  # pci_set_master()

    def _write_driver_override(
        self, bdf: str, text: str, _data: bytes, _offset: int | None
    ) -> None:
        with self._device_lock(bdf):  # driver_set_override()
            # Replaced whole, as the kernel swaps the string: a reader never sees it empty.
            attribute = self.device_dir(bdf) / "driver_override"
            staged = attribute.with_name(".driver_override.new")
            staged.write_text((text or "(null)") + "\n")
            os.replace(staged, attribute)

    def _write_config(self, bdf: str, _text: str, data: bytes, offset: int | None) -> None:
        if self.lockdown in ("integrity", "confidentiality"):
            raise OSError(errno.EPERM, "Operation not permitted")  # security_locked_down()
        if self._has_fault("dead", bdf) or self._has_fault("drops-writes", bdf):
            return  # pci_user_write_config_*() returns the count whatever the accessor did
        with self._cfg_access(bdf):  # pci_wait_cfg() while a reset holds the function
            config = bytearray((self.device_dir(bdf) / "config").read_bytes())
            start = offset or 0
            config[start : start + len(data)] = data
            (self.device_dir(bdf) / "config").write_bytes(bytes(config))
        if start <= PCI_COMMAND < start + len(data) and self._has_fault(
            "master-back-after-write", bdf
        ):
            self._set_command(bdf, self.command_of(bdf) | MASTER)
        if start == PCI_BRIDGE_CONTROL:
            self._bridge_control_written(bdf, bool(data[0] & PCI_BRIDGE_CTL_BUS_RESET))

    def _bridge_control_written(self, bridge: str, reset_asserted: bool) -> None:
        """A raw secondary bus reset: everything below reads all ones while it is held and
        comes back with its reset config; the kernel saved nothing, so restores nothing."""
        if reset_asserted and bridge not in self._raw_sbr_asserted:
            self._log_event(bridge, "raw-sbr")
            before = {
                bdf: (self.device_dir(bdf) / "config").read_bytes() for bdf in self.below(bridge)
            }
            self._raw_sbr_asserted[bridge] = (self.clock, before)
            for bdf in before:
                (self.device_dir(bdf) / "config").write_bytes(b"\xff" * 256)
        elif not reset_asserted and bridge in self._raw_sbr_asserted:
            asserted_at, before = self._raw_sbr_asserted.pop(bridge)
            held = self.clock - asserted_at
            self.raw_sbr_holds[bridge] = held
            for bdf, config in before.items():
                if held >= SBR_MIN_HOLD_S:  # reset: COMMAND all off, nothing restored
                    after = bytearray(self._config_at_reset(self.by_bdf[bdf]))
                    after[4:6] = bytes(2)
                    config = bytes(after)
                (self.device_dir(bdf) / "config").write_bytes(config)

    def _write_enable(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        with self._device_lock(bdf):  # enable_store()
            if self.driver_of(bdf) is not None:
                raise OSError(errno.EBUSY, "Device or resource busy")
            count = self._enable_count(bdf)
            if text != "0":
                self._set_enable_count(bdf, count + 1)  # pci_enable_device()
            elif count == 0:
                raise OSError(errno.EIO, "Input/output error")
            elif not self._has_fault("holds-enable", bdf):
                self._pci_disable_device(bdf)

    def _write_sriov_drivers_autoprobe(
        self, bdf: str, text: str, _data: bytes, _offset: int | None
    ) -> None:
        (self.device_dir(bdf) / "sriov_drivers_autoprobe").write_text(f"{int(text)}\n")

    def _write_sriov_numvfs(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        """sriov_numvfs_store(): needs a bound PF driver with sriov_configure; creating VFs
        probes their drivers before the write returns if sriov_drivers_autoprobe is 1, and 0
        removes them."""
        wanted, vfs = int(text), self.vfs_of(bdf)
        if wanted > len(vfs):
            raise OSError(errno.ERANGE, "Numerical result out of range")
        with self._device_lock(bdf):
            current = int(self.attribute(bdf, "sriov_numvfs"))
            if wanted == current:
                return
            if self.driver_of(bdf) is None:
                raise OSError(errno.ENOENT, "No such file or directory")
            if wanted == 0:
                self._remove_vfs(bdf)
                return
            if current:
                raise OSError(errno.EBUSY, "Device or resource busy")  # disable first
            probe = self.attribute(bdf, "sriov_drivers_autoprobe") == "1"
            for vf in vfs[:wanted]:
                if not self.exists(vf.bdf):
                    # pci_iov_add_virtfn(): the first driver that matches probes it.
                    autoprobed = vf.autoprobe_driver or vf.driver
                    self._build(dataclasses.replace(vf, driver=autoprobed), probe=probe)
            (self.device_dir(bdf) / "sriov_numvfs").write_text(f"{wanted}\n")

    def _write_reset_method(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        methods = self.by_bdf[bdf].reset_methods if text == "default" else tuple(text.split())
        if not set(methods) <= set(self.by_bdf[bdf].reset_methods):
            raise OSError(errno.EINVAL, "Invalid argument")
        (self.device_dir(bdf) / "reset_method").write_text(" ".join(methods) + "\n")

    def _write_reset(self, bdf: str, _text: str, _data: bytes, _offset: int | None) -> None:
        # pci_reset_function(): under the device lock, save config, reset with the first
        # method, restore config; `bus` resets the parent's secondary bus
        # (pci_parent_bus_reset()).
        method = self.attribute(bdf, "reset_method").split()[0]
        with self._pci_dev_lock(bdf):
            self._log_event(bdf, "reset:" + method)
            self._reset_restoring([bdf])

    def _write_remove(self, bdf: str, text: str, _data: bytes, _offset: int | None) -> None:
        # remove_store() → pci_stop_and_remove_bus_device_locked(): everything below first,
        # each driver's remove() under its device's lock.
        if not int(text):
            return
        for gone in [*reversed(self.below(bdf)), bdf]:
            if not self.exists(gone):
                continue
            with self._device_lock(gone):
                driver = self.driver_of(gone)
                if driver is not None:
                    self._remove(gone, driver)
                self.vanish(gone)

    def _write_reset_subordinate(
        self, bdf: str, _text: str, _data: bytes, _offset: int | None
    ) -> None:
        # __pci_reset_bus(): every device below locked at once (pci_bus_trylock(): config
        # access and device lock) or EAGAIN, their config saved, the bus reset, the config
        # restored as saved.
        below = self.below(bdf)
        locks = [name for below_bdf in below for name in (f"cfg-{below_bdf}", below_bdf)]
        with simlocks.try_device_locks(self.state, locks) as locked:
            if not locked:
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
            began = time.monotonic()
            simlocks.block(self.state, bdf, self.by_bdf[bdf].reset_seconds)
            self._reset_restoring(below)
            self._log_event(bdf, f"reset_subordinate {began} {time.monotonic()}")

    def _reset_restoring(self, bdfs: list[str]) -> None:
        """pci_dev_save_and_disable(), the reset, pci_dev_restore(): bus master comes back as
        it was saved, so it must be cleared before."""
        saved = {bdf: (self.device_dir(bdf) / "config").read_bytes() for bdf in bdfs}
        for bdf in bdfs:
            if self._has_fault("dead", bdf):
                continue
            (self.device_dir(bdf) / "config").write_bytes(self._config_at_reset(self.by_bdf[bdf]))
            (self.device_dir(bdf) / "config").write_bytes(saved[bdf])
            if self._has_fault("master-back-after-reset", bdf):
                self._set_command(bdf, self.command_of(bdf) | MASTER)

    def _log_event(self, bdf: str, event: str) -> None:
        self._log({"path": f"event/{bdf}", "data": event, "offset": None})

    def _log(self, entry: dict[str, object]) -> None:
        with (self.state / "writes.log").open("a") as log:
            log.write(json.dumps(entry) + "\n")

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

    def _pci_disable_device(self, bdf: str) -> None:
        """pci_disable_device(): the count goes down by one; at 0, do_pci_disable_device()
        clears bus master."""
        count = max(0, self._enable_count(bdf) - 1)
        self._set_enable_count(bdf, count)
        if count == 0:
            self._set_command(bdf, self.command_of(bdf) & ~MASTER)

    def _set_command(self, bdf: str, value: int) -> None:
        if self._has_fault("dead", bdf):
            return
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
