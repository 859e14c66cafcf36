"""A versioned JSON form of (topology, facts), so a plan can be made on another machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from petitkexec import __version__
from petitkexec.bdf import Bdf
from petitkexec.errors import SnapshotError
from petitkexec.model import PciFunction, SystemFacts, Topology

FORMAT = "petitkexec-snapshot"
VERSION = 1


def function_to_json(function: PciFunction) -> dict[str, Any]:
    return {
        "bdf": str(function.bdf),
        "vendor": f"{function.vendor:04x}",
        "device": f"{function.device:04x}",
        "class": f"{function.class_code:06x}",
        "header_type": function.header_type,
        "command": function.command,
        "driver": function.driver,
        "driver_can_unbind": function.driver_can_unbind,
        "driver_override": function.driver_override,
        "parent": _optional_str(function.parent),
        "physfn": _optional_str(function.physfn),
        "enabled": function.enabled,
        "reset_methods": list(function.reset_methods),
        "has_reset": function.has_reset,
        "has_reset_subordinate": function.has_reset_subordinate,
    }


def function_from_json(data: dict[str, Any]) -> PciFunction:
    return PciFunction(
        bdf=Bdf.parse(_typed(data, "bdf", str)),
        vendor=int(_typed(data, "vendor", str), 16),
        device=int(_typed(data, "device", str), 16),
        class_code=int(_typed(data, "class", str), 16),
        header_type=_typed(data, "header_type", int, optional=True),
        command=_typed(data, "command", int, optional=True),
        driver=_typed(data, "driver", str, optional=True),
        driver_can_unbind=_typed(data, "driver_can_unbind", bool),
        driver_override=_typed(data, "driver_override", str, optional=True),
        parent=_optional_bdf(_typed(data, "parent", str, optional=True)),
        physfn=_optional_bdf(_typed(data, "physfn", str, optional=True)),
        enabled=_typed(data, "enabled", bool, optional=True),
        reset_methods=tuple(_typed_list(data, "reset_methods", str)),
        has_reset=_typed(data, "has_reset", bool),
        has_reset_subordinate=_typed(data, "has_reset_subordinate", bool),
    )


def _typed(data: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """The value of `key`, which must be a `kind` (bool is not an int here), or None."""
    value = data[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} is {value!r}, not {kind.__name__}")
    return value


def _typed_list(data: dict[str, Any], key: str, kind: type) -> list[Any]:
    values = _typed(data, key, list)
    for value in values:
        if not isinstance(value, kind):
            raise TypeError(f"{key} holds {value!r}, not {kind.__name__}")
    return list(values)


def snapshot_to_json(topology: Topology, facts: SystemFacts) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "petitkexec": __version__,
        "functions": [function_to_json(function) for function in topology],
        "facts": facts_to_json(facts),
    }


def facts_to_json(facts: SystemFacts) -> dict[str, Any]:
    return {
        "needed": {str(bdf): why for bdf, why in sorted(facts.needed.items())},
        "lockdown": facts.lockdown,
        "kexec_loaded": facts.kexec_loaded,
        "live_update": facts.live_update,
        "powernv": facts.powernv,
    }


def facts_from_json(data: dict[str, Any]) -> SystemFacts:
    needed = _typed(data, "needed", dict)
    for reason in needed.values():
        if not isinstance(reason, str):
            raise TypeError(f"needed holds {reason!r}, not str")
    return SystemFacts(
        needed={Bdf.parse(bdf): reason for bdf, reason in needed.items()},
        lockdown=_typed(data, "lockdown", str, optional=True),
        kexec_loaded=_typed(data, "kexec_loaded", bool, optional=True),
        # Absent from the snapshots of earlier versions: inactive, not PowerNV.
        live_update=(
            _typed(data, "live_update", str, optional=True) if "live_update" in data else None
        ),
        powernv=_typed(data, "powernv", bool) if "powernv" in data else False,
    )


def snapshot_from_json(data: Any, source: str = "<snapshot>") -> tuple[Topology, SystemFacts]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SnapshotError(source, f"is not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise SnapshotError(
            source, f"has version {data.get('version')!r}; this petitkexec reads version {VERSION}"
        )
    try:
        topology = Topology.from_functions(function_from_json(f) for f in data["functions"])
        facts = facts_from_json(data["facts"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SnapshotError(source, f"is malformed ({type(error).__name__}: {error})") from error
    return topology, facts


def load_snapshot(path: Path) -> tuple[Topology, SystemFacts]:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SnapshotError(str(path), f"cannot be read ({error.strerror})") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SnapshotError(str(path), f"is not JSON ({error})") from error
    return snapshot_from_json(data, str(path))


def _optional_str(bdf: Bdf | None) -> str | None:
    return None if bdf is None else str(bdf)


def _optional_bdf(text: str | None) -> Bdf | None:
    return None if text is None else Bdf.parse(text)
