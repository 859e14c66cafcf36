"""What discovery learns about the machine: PCI functions, their topology, and system facts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from petitkexec.bdf import Bdf

PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x0004
PCI_HEADER_TYPE = 0x0E
PCI_HEADER_TYPE_MULTIFUNCTION = 0x80
PCI_HEADER_TYPE_BRIDGE = 0x01
PCI_BRIDGE_CONTROL = 0x3E
PCI_BRIDGE_CTL_BUS_RESET = 0x0040
# Base class and subclass (the class code without its programming interface): a PCI-to-PCI
# bridge, and a semi-transparent one (PCI Code and ID Assignment, class 06h).
PCI_CLASS_BRIDGE_PCI = 0x0604
PCI_CLASS_BRIDGE_PCI_SEMI_TRANSPARENT = 0x0609
CONFIG_GONE = 0xFFFF  # what a vanished, link-down or EEH-frozen function reads back


def bus_master_of(command: int | None) -> bool | None:
    """Bus master from a PCI_COMMAND value; None when unread or reading 0xffff (gone)."""
    if command is None or command == CONFIG_GONE:
        return None
    return bool(command & PCI_COMMAND_MASTER)


@dataclass(frozen=True)
class PciFunction:
    """One PCI function as sysfs showed it at discovery time."""

    bdf: Bdf
    vendor: int
    device: int
    class_code: int  # 24 bits: base class, subclass, programming interface
    header_type: int | None  # None when config space could not be read
    command: int | None  # PCI_COMMAND at discovery; None when config space could not be read
    driver: str | None = None
    driver_can_unbind: bool = False  # the driver exposes `unbind` (no suppress_bind_attrs)
    driver_override: str | None = None
    parent: Bdf | None = None  # the bridge above, None on a root bus
    physfn: Bdf | None = None  # set on SR-IOV virtual functions
    enabled: bool | None = None  # the `enable` attribute (pci_enable_device count > 0)
    reset_methods: tuple[str, ...] = ()
    has_reset: bool = False
    has_reset_subordinate: bool = False

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (root port, switch port, PCIe-to-PCI bridge): header type 1.

        A frozen or link-down function reads 0xff for its header type; the class code sysfs
        caches at enumeration still says what it is.
        """
        if self.header_type is not None and self.header_type != 0xFF:
            return (self.header_type & 0x7F) == PCI_HEADER_TYPE_BRIDGE
        return self.class_code >> 8 in (
            PCI_CLASS_BRIDGE_PCI,
            PCI_CLASS_BRIDGE_PCI_SEMI_TRANSPARENT,
        )

    @property
    def is_multifunction(self) -> bool:
        return self.header_type is not None and bool(
            self.header_type & PCI_HEADER_TYPE_MULTIFUNCTION
        )

    @property
    def is_virtfn(self) -> bool:
        return self.physfn is not None

    @property
    def bus_master_on(self) -> bool | None:
        return bus_master_of(self.command)

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@dataclass(frozen=True)
class Topology:
    """Every PCI function, indexed by address, with the parent/child and VF→PF relations."""

    functions: Mapping[Bdf, PciFunction]
    children_of: Mapping[Bdf | None, tuple[Bdf, ...]] = field(repr=False, compare=False)
    vfs_of: Mapping[Bdf, tuple[Bdf, ...]] = field(repr=False, compare=False)

    @classmethod
    def from_functions(cls, functions: Iterable[PciFunction]) -> Topology:
        by_bdf = {function.bdf: function for function in sorted(functions, key=lambda f: f.bdf)}
        children: dict[Bdf | None, list[Bdf]] = {}
        vfs: dict[Bdf, list[Bdf]] = {}
        for function in by_bdf.values():
            # A parent missing from the tree (a partial recording) makes the function a root.
            parent = function.parent if function.parent in by_bdf else None
            children.setdefault(parent, []).append(function.bdf)
            if function.physfn is not None:
                vfs.setdefault(function.physfn, []).append(function.bdf)
        return cls(
            functions=by_bdf,
            children_of={key: tuple(value) for key, value in children.items()},
            vfs_of={key: tuple(value) for key, value in vfs.items()},
        )

    def __iter__(self) -> Iterator[PciFunction]:
        return iter(self.functions.values())

    def __len__(self) -> int:
        return len(self.functions)

    def __getitem__(self, bdf: Bdf) -> PciFunction:
        return self.functions[bdf]

    def children(self, bdf: Bdf | None) -> tuple[Bdf, ...]:
        """Functions directly below a bridge; `None` gives the functions on root buses."""
        return self.children_of.get(bdf, ())

    def ancestors(self, bdf: Bdf) -> Iterator[Bdf]:
        """The bridges above a function, nearest first."""
        parent = self.functions[bdf].parent
        while parent is not None and parent in self.functions:
            yield parent
            parent = self.functions[parent].parent

    def descendants(self, bdf: Bdf) -> Iterator[Bdf]:
        """Everything below a bridge, at any depth."""
        pending = list(self.children(bdf))
        while pending:
            below = pending.pop()
            yield below
            pending.extend(self.children(below))

    def depth(self, bdf: Bdf) -> int:
        return sum(1 for _ in self.ancestors(bdf))

    def vfs(self, bdf: Bdf) -> tuple[Bdf, ...]:
        return self.vfs_of.get(bdf, ())

    @property
    def domains(self) -> tuple[int, ...]:
        return tuple(sorted({bdf.domain for bdf in self.functions}))


@dataclass(frozen=True)
class SystemFacts:
    """What the running system needs and allows, as far as a teardown is concerned."""

    # PCI functions the running system depends on, with the reason (e.g. "backs / (ext4, rw)").
    needed: Mapping[Bdf, str] = field(default_factory=dict)
    lockdown: str | None = None  # "none", "integrity", "confidentiality"; None if not exposed
    kexec_loaded: bool | None = None
    live_update: str | None = None  # why Live Update may preserve devices, None if inactive
    powernv: bool = False  # OPAL firmware (/sys/firmware/opal): resets go through it

    @property
    def needs_file_load(self) -> bool:
        """kexec_file_load (-s): the only loader integrity lockdown allows, and the only one
        Kexec HandOver (Live Update) works with."""
        return self.config_writes_blocked or self.live_update is not None

    @property
    def config_writes_blocked(self) -> bool:
        """Integrity lockdown and above make config-space writes fail with EPERM."""
        return self.lockdown in ("integrity", "confidentiality")
