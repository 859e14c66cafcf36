"""The systemd-shutdown hook and `install-systemd`, with a stand-in petitkexec.

The hook's side effects that would act on this machine (the kernel log, sysrq) are pointed at
files by PETITKEXEC_LOG and PETITKEXEC_SYSRQ in every run here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from petitkexec.cli import cli
from petitkexec.install import UNITS
from tests.clirun import runner

HOOK = Path(__file__).parents[1] / "systemd" / "petitkexec.shutdown"
STANDARD_LOCATIONS = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"]


def stub(tmp_path: Path, exit_code: int = 0) -> Path:
    path = tmp_path / "bin" / "petitkexec"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f'#!/bin/sh\necho "petitkexec $*" > {tmp_path}/called\n'
        f'echo "step lines"\nexit {exit_code}\n'
    )
    path.chmod(0o755)
    return path


def run_hook(tmp_path: Path, verb: str, defaults: str = "", **env: str) -> tuple[int, str, str]:
    (tmp_path / "defaults").write_text(defaults)
    environment = {
        "PATH": "/sbin:/usr/sbin:/bin:/usr/bin",  # PID 1's PATH on Debian: no /usr/local/bin
        "PETITKEXEC_LOG": str(tmp_path / "log"),
        "PETITKEXEC_SYSRQ": str(tmp_path / "sysrq"),
        "PETITKEXEC_DEFAULTS": str(tmp_path / "defaults"),
        **env,
    }
    done = subprocess.run(["sh", str(HOOK), verb], env=environment, check=False)
    called = tmp_path / "called"
    log = tmp_path / "log"
    return (
        done.returncode,
        called.read_text().strip() if called.exists() else "",
        log.read_text() if log.exists() else "",
    )


def test_the_hook_tears_down_within_a_time_limit_and_never_rolls_back(tmp_path: Path) -> None:
    code, called, log = run_hook(tmp_path, "kexec", f"PETITKEXEC={stub(tmp_path)}\n")
    assert code == 0
    assert called == "petitkexec teardown --time-limit 60 --no-rollback"
    assert log == "step lines\nteardown exit 0\n"


def test_the_hook_does_nothing_on_reboot_poweroff_or_halt(tmp_path: Path) -> None:
    for verb in ("reboot", "poweroff", "halt"):
        assert run_hook(tmp_path, verb, f"PETITKEXEC={stub(tmp_path)}\n") == (0, "", "")


def test_the_time_limit_comes_from_the_defaults_file(tmp_path: Path) -> None:
    defaults = f"PETITKEXEC={stub(tmp_path)}\nPETITKEXEC_TIME_LIMIT=30\n"
    assert run_hook(tmp_path, "kexec", defaults)[1].startswith(
        "petitkexec teardown --time-limit 30"
    )


@pytest.mark.skipif(
    any(os.path.exists(f"{d}/petitkexec") for d in STANDARD_LOCATIONS),
    reason="petitkexec is installed in a standard location on this machine",
)
def test_without_petitkexec_the_hook_says_so_and_fails(tmp_path: Path) -> None:
    code, called, log = run_hook(tmp_path, "kexec")
    assert code == 1 and called == ""
    assert log == "petitkexec not found: the kexec goes ahead without a teardown\n"


def test_a_hung_step_reboots_through_the_firmware_instead_of_a_kexec_that_would_hang(
    tmp_path: Path,
) -> None:
    code, _called, log = run_hook(tmp_path, "kexec", f"PETITKEXEC={stub(tmp_path, 5)}\n")
    assert code == 5
    assert "a step hung: rebooting through the firmware" in log
    assert (tmp_path / "sysrq").read_text() == "b\n"


def test_on_hang_continue_leaves_the_kexec_to_systemd(tmp_path: Path) -> None:
    defaults = f"PETITKEXEC={stub(tmp_path, 5)}\nPETITKEXEC_ON_HANG=continue\n"
    code, _called, log = run_hook(tmp_path, "kexec", defaults)
    assert code == 5 and not (tmp_path / "sysrq").exists()
    assert "rebooting" not in log


def test_install_systemd_writes_the_hook_the_units_and_where_petitkexec_is(tmp_path: Path) -> None:
    result = runner().invoke(cli, ["install-systemd", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    hook = tmp_path / "usr/lib/systemd/system-shutdown/petitkexec.shutdown"
    assert hook.read_text() == HOOK.read_text() and os.access(hook, os.X_OK)
    defaults = (tmp_path / "etc/default/petitkexec").read_text()
    command = result.stderr.splitlines()[-1].removeprefix("petitkexec runs as: ")
    assert os.path.isabs(command.split()[0])
    assert f"PETITKEXEC={command}" in defaults.replace("'", "")
    for name in UNITS:
        unit = (tmp_path / "etc/systemd/system" / name).read_text()
        exec_lines = [line for line in unit.splitlines() if line.startswith("Exec")]
        assert exec_lines and all(line.split("=", 1)[1].startswith(command) for line in exec_lines)
        wants = tmp_path / "etc/systemd/system/multi-user.target.wants" / name
        assert os.readlink(wants) == f"../{name}"


def test_install_systemd_print_writes_nothing(tmp_path: Path) -> None:
    result = runner().invoke(cli, ["install-systemd", "--root", str(tmp_path), "--print"])
    assert result.exit_code == 0
    assert "petitkexec.shutdown (mode 0755)" in result.stdout
    assert list(tmp_path.iterdir()) == []
