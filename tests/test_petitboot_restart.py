"""contrib/petitboot/petitkexec-restart: busybox init's restart action never ends without a
kexec or a way back to the menu, whatever `petitkexec exec` answers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

RESTART = Path(__file__).parents[1] / "contrib" / "petitboot" / "petitkexec-restart"


def program(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}")
    path.chmod(0o755)
    return path


def restart(tmp_path: Path, exec_status: int, kexec_status: int = 1) -> list[str]:
    """Run the restart action with stand-ins; the calls they saw, in order."""
    calls = tmp_path / "calls"
    env = {
        "PETITKEXEC": str(
            program(tmp_path / "pk", f'echo "petitkexec $*" >>{calls}\nexit {exec_status}\n')
        ),
        "KEXEC": str(
            program(tmp_path / "kexec", f'echo "kexec $*" >>{calls}\nexit {kexec_status}\n')
        ),
        "INIT": str(program(tmp_path / "init", f'echo "init" >>{calls}\n')),
        "CONSOLE": str(tmp_path / "console"),
    }
    subprocess.run(["sh", str(RESTART)], env=env, check=True)
    return calls.read_text().splitlines()


def test_it_tears_down_and_hands_off_with_kexec_e_f(tmp_path: Path) -> None:
    calls = restart(tmp_path, exec_status=4)
    assert calls[0] == f"petitkexec exec --kexec {tmp_path}/kexec -- -f"


@pytest.mark.parametrize("status", [2, 3, 70])
def test_when_nothing_was_torn_down_it_runs_the_plain_kexec_then_init(
    tmp_path: Path, status: int
) -> None:
    assert restart(tmp_path, status)[1:] == ["kexec -f -e", "init"]


@pytest.mark.parametrize("status", [1, 4, 5, 130])
def test_after_a_failed_hung_or_interrupted_handoff_it_goes_back_to_the_menu(
    tmp_path: Path, status: int
) -> None:
    assert restart(tmp_path, status)[1:] == ["init"]
    assert "back to the boot menu" in (tmp_path / "console").read_text()
