"""The systemd-shutdown hook and `install-systemd`, with a stand-in petitkexec.

The hook's side effects that would act on this machine (the kernel log, sysrq, its report in
/run) are pointed at files by PETITKEXEC_LOG, PETITKEXEC_SYSRQ and PETITKEXEC_REPORT in every run
here, and `sync` is a stand-in that says whether sysrq had been written yet."""

from __future__ import annotations

import os
import signal
import subprocess
import time
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


def stand_in_sync(tmp_path: Path, body: str = "") -> None:
    """`sync` on the hook's PATH: notes whether sysrq had been written when it ran."""
    path = tmp_path / "stand-ins" / "sync"
    path.parent.mkdir(exist_ok=True)
    sysrq = tmp_path / "sysrq"
    path.write_text(
        f"#!/bin/sh\nif [ -e {sysrq} ]; then echo after-sysrq; else echo before-sysrq; fi"
        f" >>{tmp_path}/synced\n{body}"
    )
    path.chmod(0o755)


def hook_environment(tmp_path: Path, defaults: str, **env: str) -> dict[str, str]:
    (tmp_path / "defaults").write_text(defaults)
    if not (tmp_path / "stand-ins" / "sync").exists():
        stand_in_sync(tmp_path)
    return {
        # PID 1's PATH on Debian (no /usr/local/bin), after the stand-in sync
        "PATH": f"{tmp_path}/stand-ins:/sbin:/usr/sbin:/bin:/usr/bin",
        "PETITKEXEC_LOG": str(tmp_path / "log"),
        "PETITKEXEC_SYSRQ": str(tmp_path / "sysrq"),
        "PETITKEXEC_REPORT": str(tmp_path / "report"),
        "PETITKEXEC_DEFAULTS": str(tmp_path / "defaults"),
        **env,
    }


def run_hook(tmp_path: Path, verb: str, defaults: str = "", **env: str) -> tuple[int, str, str]:
    environment = hook_environment(tmp_path, defaults, **env)
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


def test_a_hung_step_syncs_before_the_firmware_reboot(tmp_path: Path) -> None:
    # systemd-shutdown syncs only after the hooks, and sysrq b syncs nothing.
    code, _called, log = run_hook(tmp_path, "kexec", f"PETITKEXEC={stub(tmp_path, 5)}\n")
    assert code == 5
    assert (tmp_path / "synced").read_text() == "before-sysrq\n"
    assert log.index("a step hung") < log.index("file systems synced")
    assert (tmp_path / "sysrq").read_text() == "b\n"


def test_a_sync_that_never_returns_does_not_hold_back_the_firmware_reboot(tmp_path: Path) -> None:
    # A dead network or storage session can block sync(2) for ever.
    stand_in_sync(tmp_path, f"echo $$ >{tmp_path}/sync.pid\nexec sleep 60\n")
    defaults = f"PETITKEXEC={stub(tmp_path, 5)}\nPETITKEXEC_SYNC_WAIT=1\n"
    began = time.monotonic()
    try:
        code, _called, log = run_hook(tmp_path, "kexec", defaults)
        took = time.monotonic() - began
    finally:
        if (tmp_path / "sync.pid").exists():
            os.kill(int((tmp_path / "sync.pid").read_text()), signal.SIGKILL)
    assert code == 5 and took < 10, took
    assert "sync did not finish within 1 s: rebooting without it" in log
    assert (tmp_path / "sysrq").read_text() == "b\n"


def teardown_that_waits_for_sigterm(tmp_path: Path, exit_code: int) -> Path:
    """A stand-in petitkexec that runs until SIGTERM, then exits with `exit_code`."""
    path = tmp_path / "bin" / "petitkexec"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        f"#!/bin/sh\ntrap 'echo SIGTERM >{tmp_path}/got; exit {exit_code}' TERM\n"
        f"echo $$ >{tmp_path}/teardown.pid\n"
        "while :; do sleep 0.1; done\n"
    )
    path.chmod(0o755)
    return path


def kill_hook_like_systemd(tmp_path: Path, exit_code: int) -> tuple[int, bool]:
    """Start the hook, then send SIGTERM to the hook's shell alone, as the kernel does when
    systemd-shutdown's executor dies of its alarm (PR_SET_PDEATHSIG=SIGTERM on each hook).
    The hook's exit status, and whether the stand-in petitkexec was still running after."""
    defaults = f"PETITKEXEC={teardown_that_waits_for_sigterm(tmp_path, exit_code)}\n"
    environment = hook_environment(tmp_path, defaults)
    hook = subprocess.Popen(["sh", str(HOOK), "kexec"], env=environment)
    pid_file = tmp_path / "teardown.pid"
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the stand-in petitkexec never started"
            time.sleep(0.05)
        hook.send_signal(signal.SIGTERM)
        code = hook.wait(timeout=10)
    finally:
        hook.kill()
        teardown_pid = int(pid_file.read_text())
        try:
            os.kill(teardown_pid, 0)
            still_running = True
            os.kill(teardown_pid, signal.SIGKILL)
        except ProcessLookupError:
            still_running = False
    return code, still_running


def test_systemds_sigterm_reaches_petitkexec_and_the_hook_waits_for_it(tmp_path: Path) -> None:
    code, still_running = kill_hook_like_systemd(tmp_path, exit_code=130)
    assert (tmp_path / "got").read_text() == "SIGTERM\n"
    assert not still_running
    assert code == 130
    assert "teardown exit 130" in (tmp_path / "log").read_text()
    assert not (tmp_path / "sysrq").exists()


def test_a_hang_reported_after_systemds_sigterm_still_reboots_through_the_firmware(
    tmp_path: Path,
) -> None:
    # systemd goes on to `kexec -e`, which hangs in device_shutdown() behind the stuck step:
    # only the hook's sysrq b gets the machine out.
    code, still_running = kill_hook_like_systemd(tmp_path, exit_code=5)
    assert not still_running and code == 5
    assert (tmp_path / "synced").read_text() == "before-sysrq\n"
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
