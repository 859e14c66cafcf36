"""The systemd-shutdown hook tears down on kexec only."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HOOK = Path(__file__).parents[1] / "systemd" / "petitkexec.shutdown"


def run_hook(tmp_path: Path, verb: str) -> tuple[int, str]:
    stub = tmp_path / "bin" / "petitkexec"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\necho "petitkexec $*" > {tmp_path}/called\n')
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "PETITKEXEC_LOG": str(tmp_path / "log"),
    }
    done = subprocess.run(["sh", str(HOOK), verb], env=env, check=False)
    called = tmp_path / "called"
    return done.returncode, called.read_text().strip() if called.exists() else ""


def test_the_hook_tears_down_before_systemds_kexec(tmp_path: Path) -> None:
    assert run_hook(tmp_path, "kexec") == (0, "petitkexec teardown --unbind-timeout 5")


def test_the_hook_does_nothing_on_reboot_poweroff_or_halt(tmp_path: Path) -> None:
    for verb in ("reboot", "poweroff", "halt"):
        assert run_hook(tmp_path, verb) == (0, "")
