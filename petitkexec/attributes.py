"""Reading the text of sysfs attributes, one way for discovery and for the kernel object alike.

Every function takes what a read gave (None when the file was missing or unreadable) and
returns None for anything it cannot make sense of, rather than raising: a damaged or unusual
attribute must not stop a teardown.
"""

from __future__ import annotations

# What driver_override_show() prints when no override is set.
NO_OVERRIDE = "(null)"
HEX_DIGITS = frozenset("0123456789abcdef")


def parse_hex(text: str | None) -> int | None:
    """`vendor`, `device`, `class`: `0x8086\\n`."""
    if text is None:
        return None
    value = text.strip().lower()
    digits = value.removeprefix("0x")
    # int(x, 16) would also take a sign, underscores and other scripts' digits.
    if not digits or not all(character in HEX_DIGITS for character in digits):
        return None
    return int(digits, 16)


def parse_count(text: str | None) -> int | None:
    """`enable` (the enable count, not a flag) and `sriov_numvfs`: a decimal count."""
    if text is None:
        return None
    value = text.strip()
    return int(value) if value.isascii() and value.isdigit() else None


def parse_driver_override(text: str | None) -> str | None:
    value = None if text is None else text.strip()
    return None if value in (None, "", NO_OVERRIDE) else value


def parse_words(text: str | None) -> tuple[str, ...]:
    """`reset_method`: names separated by spaces."""
    return () if text is None else tuple(text.split())


def le16(data: bytes, offset: int) -> int | None:
    """A 16-bit config register: sysfs config bytes are little-endian whatever the CPU
    (pci_read_config() in pci-sysfs.c)."""
    if offset < 0 or len(data) < offset + 2:
        return None
    return int.from_bytes(data[offset : offset + 2], "little")
