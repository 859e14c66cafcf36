"""Start-up: a command imports only what it needs (the heavy parts are loaded on demand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = (
    "structlog",
    "asyncio",
    "pyudev",
    "petitkexec.execute",
    "petitkexec.run",
    "petitkexec.kernel",
    "petitkexec.journal",
)


def modules_loaded_by(args: list[str]) -> set[str]:
    code = (
        "import sys, json\n"
        "from petitkexec.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stderr.splitlines()[-1]))


def test_plan_from_a_snapshot_loads_neither_pyudev_nor_structlog_nor_the_executor(
    tmp_path: Path,
) -> None:
    snapshot = Path(__file__).parent / "fixtures" / "snapshot-q35.json"
    loaded = modules_loaded_by(["plan", "--snapshot", str(snapshot)])
    assert "petitkexec.plan" in loaded and "petitkexec.render" in loaded
    assert not loaded & set(HEAVY)


def test_help_loads_nothing_heavy() -> None:
    assert not modules_loaded_by(["--help"]) & set(HEAVY)


def test_help_loads_neither_logging_nor_traceback() -> None:
    # A few ms each at every start; `plan` on a live host needs neither (it logs nothing at
    # the default level and prints no traceback without --debug). json is not checked: the
    # helper above reports with it.
    assert not modules_loaded_by(["--help"]) & {"logging", "traceback"}
