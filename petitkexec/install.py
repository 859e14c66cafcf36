"""`petitkexec install-systemd`: the shutdown hook and the two units, where systemd reads them.

The files ship inside the package (systemd/ is petitkexec.systemd), so this works however
petitkexec was installed. What it does is also printed as the equivalent shell lines.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HOOK = "petitkexec.shutdown"
UNITS = ("petitkexec-snapshot.service", "petitkexec-verify.service")
HOOK_DIR = Path("usr/lib/systemd/system-shutdown")
UNIT_DIR = Path("etc/systemd/system")
WANTS_DIR = UNIT_DIR / "multi-user.target.wants"
DEFAULTS = Path("etc/default/petitkexec")


@dataclass(frozen=True)
class InstalledFile:
    path: Path  # relative to the root
    text: str
    mode: int


def this_command() -> str:
    """How to start the petitkexec that is running now, by absolute path: hooks and units
    run with PATHs that may not contain pip's /usr/local/bin, and a zipapp is not on any."""
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if program.endswith(".pyz"):
        return f"{sys.executable} {program}"
    found = shutil.which("petitkexec")
    if found is not None and os.path.isabs(found):
        return found
    return f"{sys.executable} -m petitkexec"


def _shipped(name: str) -> str:
    return resources.files("petitkexec.systemd").joinpath(name).read_text()


def files_to_install(command: str) -> list[InstalledFile]:
    """The hook, the units with `petitkexec` in their Exec lines made absolute, and the
    defaults file the hook reads the command from."""
    units = [
        InstalledFile(
            UNIT_DIR / name,
            _shipped(name).replace("=petitkexec ", f"={command} "),
            0o644,
        )
        for name in UNITS
    ]
    defaults = InstalledFile(
        DEFAULTS,
        "# Read by the petitkexec systemd-shutdown hook.\n"
        f"PETITKEXEC={shlex.quote(command)}\n"
        "PETITKEXEC_TIME_LIMIT=60  # seconds; systemd gives hooks 90\n"
        "PETITKEXEC_ON_HANG=reboot  # reboot through the firmware if a step hangs; or: continue\n",
        0o644,
    )
    return [InstalledFile(HOOK_DIR / HOOK, _shipped(HOOK), 0o755), *units, defaults]


def install(root: Path, command: str) -> list[str]:
    """Write the files under `root` and enable the units; return the equivalent shell lines."""
    lines = []
    for item in files_to_install(command):
        target = root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.path == DEFAULTS and target.exists():
            lines.append(f"# kept {target}: it is the admin's")
            continue
        target.write_text(item.text)
        target.chmod(item.mode)
        lines.append(f"install -D -m {item.mode:04o} {item.path.name} {target}")
    wants = root / WANTS_DIR
    wants.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        # What `systemctl enable` does for WantedBy=multi-user.target, without needing a
        # running systemd (image builds, --root).
        link = wants / name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(Path("..") / name)
        lines.append(f"ln -sf ../{name} {link}")
    return lines
