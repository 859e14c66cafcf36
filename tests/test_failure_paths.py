"""Failure paths that used to end badly (issue 17), on the simulated kernel through the
command line: a stopped run never hands off, signals at any point lead to a rollback that is
reported in full, forked children never run the parent's code, --no-rollback holds on every
path, an abandoned unbind is journalled, and what a late probe brings back is reported."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import petitkexec.cli
from petitkexec.errors import ExitCode
from tests.clirun import environment, fake_kexec, invoke, shell_script
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel, root_port

NIC = "0000:02:00.0"
NVME_PF = "0000:01:00.0"
REPO = Path(__file__).resolve().parent.parent


def bound(sim: SimKernel) -> dict[str, str | None]:
    return {f.bdf: sim.driver_of(f.bdf) for f in sim.functions if sim.exists(f.bdf)}


def nics(*remove_seconds: float) -> list[SimFunction]:
    """Endpoints on the root bus, each with a remove() that takes this long."""
    return [
        SimFunction(f"0000:00:{slot:02x}.0", driver="e1000e", remove_seconds=seconds)
        for slot, seconds in enumerate(remove_seconds, start=2)
    ]


def on_outcome(monkeypatch: pytest.MonkeyPatch, react: Callable[[int], None]) -> None:
    """Run `react(index)` as the CLI reports each step's outcome."""
    print_outcome = petitkexec.cli._print_outcome

    def reporting(index: int, total: int, outcome: object) -> None:
        print_outcome(index, total, outcome)  # type: ignore[arg-type]
        react(index)

    monkeypatch.setattr(petitkexec.cli, "_print_outcome", reporting)


# 2. a run stopped by --time-limit never hands off
def test_2_exec_stopped_by_the_time_limit_rolls_back_and_does_not_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", nics(0, 0, 0))
    before = bound(sim)
    kexec = fake_kexec(tmp_path, sim)
    on_outcome(monkeypatch, lambda index: time.sleep(0.6) if index == 1 else None)
    result = invoke(
        environment(sim, tmp_path),
        "exec",
        "--kexec",
        str(kexec),
        "--time-limit",
        "0.5",
        "--jobs",
        "1",
    )
    assert "stopped: time limit of 0.5 s reached" in result.stderr
    assert "no handoff: not attempted (the run was stopped" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    assert bound(sim) == before


# 3. signals at any point up to the handoff, and during the rollback
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_3_sighup_and_sigquit_mid_teardown_stop_and_roll_back(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    sim = make_sim()
    before = bound(sim)
    kexec = fake_kexec(tmp_path, sim)
    on_outcome(monkeypatch, lambda index: os.kill(os.getpid(), signum) if index == 3 else None)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--jobs", "1")
    assert result.exit_code == ExitCode.INTERRUPTED
    assert f"interrupted by {signum.name}" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert bound(sim) == before


def test_3_sigterm_while_the_kexec_child_runs_is_rolled_back_and_exits_130(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    before = bound(sim)
    # systemd-shutdown's or a supervisor's SIGTERM reaching petitkexec, not kexec.
    kexec = shell_script(tmp_path / "kexec", "kill -TERM $PPID\nsleep 0.2\nexit 1\n")
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "interrupted by SIGTERM during the handoff" in result.stderr
    assert f"rollback: rebind {NIC} to e1000e: ok" in result.stderr
    assert bound(sim) == before


def test_3_sigterm_during_the_sync_stops_before_kexec_runs(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    before = bound(sim)
    kexec = fake_kexec(tmp_path, sim)
    monkeypatch.setattr(os, "sync", lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "not run: a stop signal came during the sync" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert bound(sim) == before


def test_3_a_second_ctrl_c_during_the_rollback_neither_cuts_it_nor_loses_its_results(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    before = bound(sim)
    first_bind = tmp_path / "first-bind"
    bind = SimKernel._bind

    def bind_after_ctrl_c(self: SimKernel, bdf: str, driver: str) -> None:
        if not first_bind.exists():  # in the rollback's child: Ctrl-C reaches the parent
            first_bind.write_text(bdf)
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(0.1)
        bind(self, bdf, driver)

    monkeypatch.setattr(SimKernel, "_bind", bind_after_ctrl_c)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.INTERRUPTED
    assert "interrupted by SIGINT during the handoff" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rollback: ")]
    assert f"rollback: rebind {first_bind.read_text()} to" in "\n".join(lines)
    assert all(line.endswith(": ok") for line in lines), lines
    assert bound(sim) == before


# 4. a forked child never runs its parent's code
def test_4_a_child_whose_report_meets_a_closed_pipe_never_returns_into_the_parent(
    tmp_path: Path,
) -> None:
    log = tmp_path / "who-unwound"
    script = f"""
import os, time
from petitkexec.deadline import start_child
parent = os.getpid()
try:
    child = start_child(lambda: time.sleep(0.3), 5)
    os.close(child.read_end)  # as if the parent had died: the child's report meets EPIPE
    time.sleep(0.8)
finally:
    with open({str(log)!r}, "a") as out:
        out.write("parent\\n" if os.getpid() == parent else "child\\n")
"""
    subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=20, check=False)
    assert log.read_text().split() == ["parent"]


# 5. the exception path: --no-rollback holds, and no rollback races a running child
def test_5_an_error_writing_the_report_leaves_a_no_rollback_run_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", nics(0, 0, 0))

    def disk_full(index: int) -> None:
        if index == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    on_outcome(monkeypatch, disk_full)
    result = invoke(environment(sim, tmp_path), "teardown", "--jobs", "1", "--no-rollback")
    assert result.exit_code == ExitCode.INTERNAL
    assert "not rolled back (--no-rollback): 4 changes left as they are" in result.stderr
    assert sim.driver_of("0000:00:02.0") is None and sim.driver_of("0000:00:03.0") is None


def test_5_the_rollback_after_an_error_waits_for_the_unbinds_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", nics(0, 0.6, 0.6))
    before = bound(sim)

    def disk_full(index: int) -> None:
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device")

    on_outcome(monkeypatch, disk_full)
    result = invoke(environment(sim, tmp_path), "teardown", "--jobs", "3")
    assert result.exit_code == ExitCode.INTERNAL
    assert "rolled back 6 changes" in result.stderr
    time.sleep(0.8)  # long enough for any unbind the rollback did not wait for to land
    assert bound(sim) == before


# 8. SR-IOV rollback: each VF ends on the driver it had, and the undo says what is there
def sriov_nic() -> list[SimFunction]:
    """A PF whose VFs were handed to vfio-pci; recreated, they would autoprobe ixgbevf."""
    vf = {"parent": "0000:00:02.0", "physfn": "0000:01:00.0", "driver": "vfio-pci"}
    return [
        root_port("0000:00:02.0"),
        SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="ixgbe", multifunction=True),
        SimFunction("0000:01:00.1", autoprobe_driver="ixgbevf", **vf),  # type: ignore[arg-type]
        SimFunction("0000:01:00.2", autoprobe_driver="ixgbevf", **vf),  # type: ignore[arg-type]
    ]


def test_8_a_rolled_back_vf_ends_on_its_own_driver_not_the_autoprobed_one(
    tmp_path: Path,
) -> None:
    sim = SimKernel(tmp_path / "sys", sriov_nic())
    for vf in ("0000:01:00.1", "0000:01:00.2"):
        (sim.device_dir(vf) / "driver_override").write_text("vfio-pci\n")
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    for vf in ("0000:01:00.1", "0000:01:00.2"):
        assert sim.driver_of(vf) == "vfio-pci", vf
        assert sim.attribute(vf, "driver_override") == "vfio-pci"
        assert f"rollback: rebind {vf} to vfio-pci: ok" in result.stderr
    assert sim.attribute("0000:01:00.0", "sriov_drivers_autoprobe") == "1"
    assert "rollback: turn sriov_drivers_autoprobe back on for 0000:01:00.0: ok" in result.stderr


def test_8_a_vf_that_ends_on_another_driver_is_reported_as_it_is(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "sys", sriov_nic())
    sim.fail_write("0000:01:00.0", "sriov_drivers_autoprobe", errno.EACCES)  # cannot turn off
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert "rollback: rebind 0000:01:00.1 to vfio-pci: bound to ixgbevf, not vfio-pci" in (
        result.stderr
    )
