"""Which functions a run may touch: --exclude/--only specs, --unprotect, and the config file."""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from petitkexec.errors import UsageError
from petitkexec.model import PciFunction

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/petitkexec.toml")

_BDF_GLOB = re.compile(
    r"^(?:[0-9a-fA-F*?\[\]-]+:)?[0-9a-fA-F*?\[\]-]+:[0-9a-fA-F*?\[\]-]+\.[0-7*?\[\]-]+$"
)
_VENDOR_DEVICE = re.compile(r"^(?P<vendor>[0-9a-fA-F]{4}|\*):(?P<device>[0-9a-fA-F]{4}|\*)$")
_CLASS = re.compile(r"^class:(?:0x)?(?P<prefix>[0-9a-fA-F]{2}|[0-9a-fA-F]{4}|[0-9a-fA-F]{6})$")
_DRIVER = re.compile(r"^(?:driver:)?(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]*)$")

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
        if _VENDOR_DEVICE.match(value):
            return cls(text, "id", value.lower())
        if match := _CLASS.match(value):
            return cls(text, "class", match["prefix"].lower())
        if _BDF_GLOB.match(value):
            # A short glob (00:1f.*) means domain 0000, as lspci and setpci read it.
            pattern = value.lower() if value.count(":") == 2 else f"0000:{value.lower()}"
            return cls(text, "bdf", pattern)
        if match := _DRIVER.match(value):
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


def _parse_all(values: Iterable[str], option: str) -> tuple[DeviceSpec, ...]:
    return tuple(DeviceSpec.parse(value, option) for value in values)


@dataclass(frozen=True)
class Policy:
    """What the user asked for; the plan applies it to every function."""

    exclude: tuple[DeviceSpec, ...] = ()
    only: tuple[DeviceSpec, ...] = ()
    # Let the teardown touch functions the running system needs (the root disk, a 9p share...).
    unprotect: tuple[DeviceSpec, ...] = ()
    hot_reset: bool = False

    @classmethod
    def from_options(
        cls,
        *,
        exclude: Iterable[str] = (),
        only: Iterable[str] = (),
        unprotect: Iterable[str] = (),
        hot_reset: bool = False,
        config: Mapping[str, object] | None = None,
    ) -> Policy:
        """Command-line values are added to the config file's lists; flags are or-ed."""
        config = config or {}
        return cls(
            exclude=_parse_all([*_config_list(config, "exclude"), *exclude], "--exclude"),
            only=_parse_all([*_config_list(config, "only"), *only], "--only"),
            unprotect=_parse_all([*_config_list(config, "unprotect"), *unprotect], "--unprotect"),
            hot_reset=_config_bool(config, "hot-reset") or hot_reset,
        )

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


CONFIG_KEYS = frozenset({"exclude", "only", "unprotect", "hot-reset", "unbind-timeout"})


def load_config(path: Path | None) -> dict[str, object]:
    """Read the TOML config: a missing default file is empty, a missing --config an error."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return {}
        path, option = DEFAULT_CONFIG_PATH, str(DEFAULT_CONFIG_PATH)
    else:
        option = "--config"
    try:
        with path.open("rb") as handle:
            config: dict[str, object] = tomllib.load(handle)
    except OSError as error:
        raise UsageError(option, str(path), f"cannot be read ({error.strerror})") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(option, str(path), f"is not valid TOML ({error})") from error
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise UsageError(
            option,
            str(path),
            f"has unknown key {unknown[0]!r}; known: " + ", ".join(sorted(CONFIG_KEYS)),
        )
    return config


def _config_list(config: Mapping[str, object], key: str) -> list[str]:
    value = config.get(key, [])
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UsageError(f"config key {key}", repr(value), "must be a string or a list of strings")
    return value


def _config_bool(config: Mapping[str, object], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"config key {key}", repr(value), "must be true or false")
    return value
