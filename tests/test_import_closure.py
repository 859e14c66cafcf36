"""A firmware image ships only the standard-library modules in bench/stdlib-closure.txt: every
command path, run as its own process, must stay inside that list (bench/firmware_footprint.py
finds the closure and measures what it weighs)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_zipapp
import firmware_footprint

REPO = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("click", "pyudev", "structlog")


def _source_entries() -> list[str]:
    """The source tree, then where this interpreter has click, pyudev and structlog."""
    located = {
        str(Path(importlib.util.find_spec(name).origin).parents[1])  # type: ignore[arg-type,union-attr]
        for name in DEPENDENCIES
    }
    return [str(REPO), *sorted(located)]


@pytest.fixture(scope="module")
def per_path() -> dict[str, dict[str, str]]:
    pinned = {pin.name: pin.version for pin in build_zipapp.PINS}
    installed = {name: importlib.metadata.version(name) for name in DEPENDENCIES}
    if any(installed[name] != pinned[name] for name in DEPENDENCIES):
        if os.environ.get("PETITKEXEC_DEBIAN_LIBS") == "1":
            # scripts/test-debian-libs runs the suite against Debian 12's older click and
            # structlog, which import other modules; the closure is the pinned archive's.
            pytest.skip(f"closure is for the archive's pins {pinned}, not Debian's {installed}")
        pytest.fail(
            f"the firmware archive pins {pinned} (scripts/build_zipapp.py) but this "
            f"environment has {installed}: install the pins, or move the pins and re-measure"
        )
    return firmware_footprint.closure_of(sys.executable, _source_entries())


def test_every_command_path_stays_inside_the_allowed_stdlib_closure(
    per_path: dict[str, dict[str, str]],
) -> None:
    allowed = firmware_footprint.read_closure_list()
    outside = {
        path: sorted(set(modules) - allowed)
        for path, modules in per_path.items()
        if set(modules) - allowed
    }
    assert not outside, (
        "outside bench/stdlib-closure.txt (a firmware image would not have them; "
        f"import them lazily, or add them and re-measure the footprint): {outside}"
    )


def test_the_probe_sees_the_commands_at_work(per_path: dict[str, dict[str, str]]) -> None:
    # The paths really ran: plan imported the planner, the every-import probe configured
    # structlog (asyncio through structlog.stdlib), and the blocked optional modules stayed out.
    assert "json" in per_path["plan --json"]
    assert "asyncio" in per_path["every import (exec, teardown)"]
    assert not set(firmware_footprint.OPTIONAL) & set(firmware_footprint.union(per_path))


def test_a_module_outside_the_closure_is_caught(tmp_path: Path) -> None:
    """The check itself: a closure list without `json` rejects `plan --json`."""
    allowed = firmware_footprint.read_closure_list() - {"json"}
    trimmed = tmp_path / "closure.txt"
    firmware_footprint.write_closure_list(allowed, trimmed)
    stdlib = sysconfig.get_paths()["stdlib"]
    with tempfile.TemporaryDirectory() as scratch:
        args = firmware_footprint.command_paths(Path(scratch))["plan --json"]
        loaded = firmware_footprint.stdlib_part(
            firmware_footprint.run_dumped(sys.executable, _source_entries(), args), stdlib
        )
    assert "json" in set(loaded) - firmware_footprint.read_closure_list(trimmed)
