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


def restart(
    tmp_path: Path, exec_status: int, kexec_status: int = 1, petitkexec: str | None = None
) -> list[str]:
    """Run the restart action with stand-ins; the calls they saw, in order. `petitkexec`
    replaces the stand-in petitkexec by a path (one that cannot run, say)."""
    calls = tmp_path / "calls"
    if petitkexec is None:
        body = f'echo "petitkexec $*" >>{calls}\necho "a report line"\nexit {exec_status}\n'
        petitkexec = str(program(tmp_path / "pk", body))
    env = {
        "PETITKEXEC": petitkexec,
        "KEXEC": str(
            program(tmp_path / "kexec", f'echo "kexec $*" >>{calls}\nexit {kexec_status}\n')
        ),
        "INIT": str(program(tmp_path / "init", f'echo "init" >>{calls}\n')),
        "CONSOLE": str(tmp_path / "console"),
        "KMSG": str(tmp_path / "kmsg"),
    }
    subprocess.run(["sh", str(RESTART)], env=env, check=True, stdout=subprocess.DEVNULL)
    return calls.read_text().splitlines()


def test_it_tears_down_and_hands_off_with_kexec_e_f(tmp_path: Path) -> None:
    calls = restart(tmp_path, exec_status=4)
    assert calls[0] == f"petitkexec exec --kexec {tmp_path}/kexec -- -f"


@pytest.mark.parametrize("status", [1, 2, 3, 70])
def test_when_nothing_was_torn_down_it_runs_the_plain_kexec_then_init(
    tmp_path: Path, status: int
) -> None:
    # 1: `exec` without --strict never ends a teardown with it; Python stopped before
    # petitkexec's own code (an import error in a broken install).
    assert restart(tmp_path, status)[1:] == ["kexec -f -e", "init"]


def test_a_petitkexec_that_is_not_executable_falls_back_to_the_plain_kexec(tmp_path: Path) -> None:
    unusable = tmp_path / "petitkexec"
    unusable.write_text("#!/bin/sh\n")  # mode 0644: the shell answers 126
    assert restart(tmp_path, 0, petitkexec=str(unusable)) == ["kexec -f -e", "init"]
    assert "petitkexec exec ended with 126" in (tmp_path / "console").read_text()


def test_a_petitkexec_that_is_not_there_falls_back_to_the_plain_kexec(tmp_path: Path) -> None:
    assert restart(tmp_path, 0, petitkexec=str(tmp_path / "absent")) == ["kexec -f -e", "init"]
    assert "petitkexec exec ended with 127" in (tmp_path / "console").read_text()


@pytest.mark.parametrize("status", [4, 5, 130, 137])
def test_after_a_failed_hung_interrupted_or_killed_handoff_it_goes_back_to_the_menu(
    tmp_path: Path, status: int
) -> None:
    assert restart(tmp_path, status)[1:] == ["init"]
    assert "back to the boot menu" in (tmp_path / "console").read_text()


def test_the_report_goes_to_the_console_and_the_kernel_log(tmp_path: Path) -> None:
    # buildroot's inittab line is `null::restart:`: stdout is /dev/null.
    restart(tmp_path, 5)
    console = (tmp_path / "console").read_text().splitlines()
    kmsg = (tmp_path / "kmsg").read_text().splitlines()
    assert console[:2] == ["a report line", "petitkexec-restart: petitkexec exec ended with 5"]
    assert kmsg[:2] == [
        "<6>petitkexec: a report line",
        "<6>petitkexec-restart: petitkexec exec ended with 5",
    ]
    assert kmsg[-1] == "<6>petitkexec-restart: no kexec; back to the boot menu"


def test_a_report_without_a_final_newline_keeps_its_last_line_and_the_exit_status(
    tmp_path: Path,
) -> None:
    petitkexec = program(tmp_path / "pk", "printf 'last words'\nexit 3\n")
    assert restart(tmp_path, 0, petitkexec=str(petitkexec)) == ["kexec -f -e", "init"]
    console = (tmp_path / "console").read_text().splitlines()
    assert console[:2] == ["last words", "petitkexec-restart: petitkexec exec ended with 3"]
