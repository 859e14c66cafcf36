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
from tests import simlocks
from tests.clirun import environment, fake_kexec, invoke, shell_script
from tests.conftest import SimFactory, q35_like
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
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=lambda s: s.name)
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


def test_5_a_failed_handoff_with_no_rollback_leaves_the_teardown_as_it_is(tmp_path: Path) -> None:
    sim = SimKernel(tmp_path / "sys", nics(0, 0))
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--no-rollback")
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert "rollback:" not in result.stderr
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


# 7. what a late probe or a COMMAND write brings back before the handoff
DRIVERLESS = "0000:00:05.0"  # no driver, bus master on: a clear-bus-master step


def with_driverless() -> list[SimFunction]:
    return [*nics(0), SimFunction(DRIVERLESS)]


def after_its_step(
    monkeypatch: pytest.MonkeyPatch, sim: SimKernel, act: Callable[[], object]
) -> None:
    """`act` runs once the driverless function's step is reported."""
    done: list[bool] = []

    def react(_index: int) -> None:
        if not done and sim.writes() and not sim.bus_master_on(DRIVERLESS):
            done.append(True)
            act()

    on_outcome(monkeypatch, react)


def test_7_a_late_probe_cannot_bind_a_function_whose_bus_master_was_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", with_driverless())
    probed: list[str | None] = []
    after_its_step(monkeypatch, sim, lambda: probed.append(sim.late_probe(DRIVERLESS, "e1000e")))
    result = invoke(environment(sim, tmp_path), "teardown")
    assert probed == [None]  # driver_override "none" kept udev's modprobe away
    assert result.exit_code == ExitCode.OK
    assert sim.driver_of(DRIVERLESS) is None and not sim.bus_master_on(DRIVERLESS)
    assert sim.attribute(DRIVERLESS, "driver_override") == "none"


def test_7_the_override_on_a_driverless_function_is_undone_by_the_rollback(
    tmp_path: Path,
) -> None:
    sim = SimKernel(tmp_path / "sys", with_driverless())
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert f"rollback: restore driver_override (null) on {DRIVERLESS}: ok" in result.stderr
    assert sim.attribute(DRIVERLESS, "driver_override") == "(null)"


def test_7_a_function_bound_again_before_the_handoff_is_a_failed_step_and_strict_withholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", with_driverless())
    kexec = fake_kexec(tmp_path, sim)
    after_its_step(monkeypatch, sim, lambda: sim.probe_under_way(DRIVERLESS, "e1000e"))
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--strict")
    assert f"FAILED {DRIVERLESS}: bus master cleared; came back: bound to e1000e again" in (
        result.stderr
    )
    assert "no handoff: not attempted (--strict: a step failed)" in result.stderr
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    assert not (tmp_path / "kexec-args").exists()


def test_7_bus_master_on_again_without_a_driver_is_cleared_again_or_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", with_driverless())
    kexec = fake_kexec(tmp_path, sim)

    def someone_sets_master() -> None:
        sim._set_command(DRIVERLESS, sim.command_of(DRIVERLESS) | 0x4)
        sim.fail_write(DRIVERLESS, "config", errno.EIO)  # and it cannot be cleared again

    after_its_step(monkeypatch, sim, someone_sets_master)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert "came back: bus master on again before the handoff" in result.stderr
    assert "stopped: bus master on again and not clearable" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL


# 6. deadlines that fit the device, and an abandoned unbind journalled
def test_6_an_nvme_unbind_gets_the_drivers_own_shutdown_bound_not_the_default_deadline(
    tmp_path: Path,
) -> None:
    nvme = SimFunction("0000:00:02.0", 0x1B36, 0x0010, 0x010802, driver="nvme", remove_seconds=1)
    sim = SimKernel(tmp_path / "sys", [nvme])
    result = invoke(environment(sim, tmp_path), "teardown", "--unbind-timeout", "0.3")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert sim.driver_of("0000:00:02.0") is None


def test_6_the_nvme_deadline_follows_nvme_core_shutdown_timeout(tmp_path: Path) -> None:
    from petitkexec.unbind import unbind_deadline_s

    sim = SimKernel(tmp_path / "sys", nics(0))
    kernel = sim.kernel
    assert unbind_deadline_s(kernel, "e1000e", 5) == 5
    assert unbind_deadline_s(kernel, "nvme", 5) == 62  # RTD3E clamped to at most 60 s
    parameters = sim.root / "module" / "nvme_core" / "parameters"
    parameters.mkdir(parents=True)
    (parameters / "shutdown_timeout").write_text("90\n")
    assert unbind_deadline_s(kernel, "nvme", 5) == 92
    assert unbind_deadline_s(kernel, "nvme", 120) == 120


def test_6_an_abandoned_unbind_that_returns_later_leaves_the_function_bindable(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    functions = [
        SimFunction(**{**f.__dict__, "remove_hangs": True}) if f.bdf == NIC else f  # type: ignore[arg-type]
        for f in q35_like()
    ]
    sim = make_sim(functions)
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--unbind-timeout", "1"
    )
    assert result.exit_code == ExitCode.HUNG
    assert f"rollback: rebind {NIC} to e1000e: remove() (child" in result.stderr
    simlocks.release(sim.state, NIC)  # remove() returns; the override write waiting on it lands
    deadline = time.monotonic() + 10
    while sim.attribute(NIC, "driver_override") != "(null)" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.attribute(NIC, "driver_override") == "(null)"  # not left "none"
    # Bindable again: a manual bind works, unless udev's probe after the unbind got there first.
    assert sim.driver_of(NIC) == "e1000e" or sim.late_probe(NIC, "e1000e") == "e1000e"


def test_6_an_abandoned_unbind_still_stuck_at_rollback_is_reported_not_claimed_restored(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    functions = [
        SimFunction(**{**f.__dict__, "remove_hangs": True}) if f.bdf == NIC else f  # type: ignore[arg-type]
        for f in q35_like()
    ]
    sim = make_sim(functions)  # the hung remove() holds NIC's device_lock (tests/simlocks.py)
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--unbind-timeout", "1"
    )
    assert result.exit_code == ExitCode.HUNG
    line = next(x for x in result.stderr.splitlines() if x.startswith(f"rollback: rebind {NIC}"))
    assert "still holds device_lock: driver_override (null) is written when it returns" in line
    assert not line.endswith(": ok")
    assert sim.driver_of(NVME_PF) == "nvme"  # the other undos went on
