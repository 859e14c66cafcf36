"""Which functions a run may touch: --exclude/--only/--unprotect device specs."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from petitkexec.errors import UsageError
from petitkexec.model import PciFunction

# Patterns, compiled by `re` at their first use (and cached there): most runs parse no spec,
# and compiling is pure Python, slow at every start under emulation.
_BDF_GLOB = r"^(?:[0-9a-fA-F*?\[\]-]+:)?[0-9a-fA-F*?\[\]-]+:[0-9a-fA-F*?\[\]-]+\.[0-7*?\[\]-]+$"
_VENDOR_DEVICE = r"^(?P<vendor>[0-9a-fA-F]{4}|\*):(?P<device>[0-9a-fA-F]{4}|\*)$"
_CLASS = r"^class:(?:0x)?(?P<prefix>[0-9a-fA-F]{2}|[0-9a-fA-F]{4}|[0-9a-fA-F]{6})$"
_DRIVER = r"^(?:driver:)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]*)$"

SPEC_SYNTAX = (
    "a BDF glob (0000:00:1f.*), vendor:device (8086:10d3, 8086:*), "
    "class:HEX (class:0c03, class:0106) or a driver name (nvme, driver:ahci)"
)


@dataclass(frozen=True)
class DeviceSpec:
    """One --exclude/--only/--unprotect value, parsed once; `text` is what the user wrote."""

    text: str
    kind: str  # "bdf", "id", "class" or "driver"
    pattern: str

    @classmethod
    def parse(cls, text: str, option: str) -> DeviceSpec:
        value = text.strip()
        if re.match(_VENDOR_DEVICE, value):
            return cls(text, "id", value.lower())
        if match := re.match(_CLASS, value):
            return cls(text, "class", match["prefix"].lower())
        if re.match(_BDF_GLOB, value):
            # A short glob (00:1f.*) means domain 0000, as lspci and setpci read it.
            pattern = value.lower() if value.count(":") == 2 else f"0000:{value.lower()}"
            return cls(text, "bdf", pattern)
        if match := re.match(_DRIVER, value):
            return cls(text, "driver", match["name"])
        raise UsageError(option, text, f"is not a device spec; expected {SPEC_SYNTAX}")

    def matches(self, function: PciFunction) -> bool:
        if self.kind == "bdf":
            return fnmatch.fnmatchcase(str(function.bdf), self.pattern)
        if self.kind == "id":
            return fnmatch.fnmatchcase(function.vendor_device, self.pattern)
        if self.kind == "class":
            digits = len(self.pattern)
            return f"{function.class_code:06x}"[:digits] == self.pattern
        return function.driver == self.pattern


@dataclass(frozen=True)
class Policy:
    """What the user asked for (see petitkexec.settings); the plan applies it to every function."""

    exclude: tuple[DeviceSpec, ...] = ()
    only: tuple[DeviceSpec, ...] = ()
    # Let the teardown touch functions the running system needs (the root disk, a 9p share...).
    unprotect: tuple[DeviceSpec, ...] = ()
    hot_reset: bool = False
    ignore_quirks: frozenset[str] = frozenset()  # ids from petitkexec.quirks

    def excluded_by(self, function: PciFunction) -> str | None:
        """Why policy keeps this function out of the teardown, or None if it may be touched."""
        for spec in self.exclude:
            if spec.matches(function):
                return f"excluded by --exclude {spec.text}"
        if self.only and not any(spec.matches(function) for spec in self.only):
            return "not selected by --only"
        return None

    def unprotected(self, function: PciFunction) -> bool:
        return any(spec.matches(function) for spec in self.unprotect)
