"""The PCI address value type: domain:bus:device.function, as sysfs spells it."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)


@dataclass(frozen=True, order=True)
class Bdf:
    """A PCI function's address: domain, bus, device, function."""

    domain: int
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.bus <= 0xFF and 0 <= self.device <= 0x1F and 0 <= self.function <= 7):
            raise ValueError(
                f"PCI address out of range: {self.domain:x}:{self.bus:x}:"
                f"{self.device:x}.{self.function}"
            )
        if not 0 <= self.domain <= 0xFFFFFFFF:
            raise ValueError(f"PCI domain out of range: {self.domain:x}")

    @staticmethod
    def parse(text: str) -> Bdf:
        """Parse `0000:00:1f.2` (or `00:1f.2`, domain 0); anything else is a ValueError."""
        return _parse(text)

    @classmethod
    def innermost_in(cls, path: str) -> Bdf | None:
        """The PCI function a sysfs path lies below: its last full address (the ones before
        it are the bridges above)."""
        for part in reversed(path.split("/")):
            match = _BDF.match(part)
            if match is not None and match["domain"] is not None:
                return cls.parse(part)
        return None

    @property
    def slot(self) -> tuple[int, int, int]:
        """What the functions of one multi-function device share."""
        return (self.domain, self.bus, self.device)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"


# A snapshot names most addresses several times (each function, its parent, its PF): a 10k
# machine has about 30,000 of them, a third distinct. Bdf is immutable, so the answers can be
# shared; errors are not cached and are raised again.
@functools.lru_cache(maxsize=1 << 16)
def _parse(text: str) -> Bdf:
    match = _BDF.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a PCI address (expected DDDD:BB:DD.F)")
    bus, device = int(match["bus"], 16), int(match["device"], 16)
    if device > 0x1F:
        raise ValueError(f"{text!r} is not a PCI address (device number above 1f)")
    return Bdf(int(match["domain"] or "0", 16), bus, device, int(match["function"]))
