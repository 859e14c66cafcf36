"""Clearing bus master through config space, and through `enable` when integrity lockdown
refuses config writes (EPERM): every outcome, what it leaves behind and what it journals."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.busmaster import BusMasterClearer
from petitkexec.journal import Journal, Undo, UndoKind
from petitkexec.kernel import Kernel
from petitkexec.outcome import Status, StepOutcome
from petitkexec.plan import Action, Step
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel

BDF = "0000:00:05.0"
STEP = Step(Bdf.parse(BDF), Action.CLEAR_BUS_MASTER, "no driver, BME on")


def clear(sim: SimKernel, kernel: Kernel | None = None) -> tuple[StepOutcome, Journal]:
    journal = Journal(undo_timeout_s=2)
    outcome = BusMasterClearer(kernel or sim.kernel, journal).clear(STEP)
    assert outcome.step is STEP  # the report and rollback find the step by it
    return outcome, journal


def test_a_bound_driver_under_lockdown_leaves_bus_master_on_and_says_why(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(
        [SimFunction(BDF, driver="lpc_ich", can_unbind=False, command=0x0007)],
        lockdown="integrity",
    )
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.FAILED,
        "config writes blocked (EPERM, lockdown?) and lpc_ich is bound: bus master left on",
        0x0007,
    )
    assert sim.bus_master_on(BDF) and journal.entries == []
    assert not any(w["path"].endswith("/enable") for w in sim.writes())


def test_without_an_enable_attribute_under_lockdown_the_step_fails_naming_it(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF)], lockdown="integrity")
    enable = sim.device_dir(BDF) / "enable"
    enable.unlink()
    outcome, journal = clear(sim)
    assert outcome.status is Status.FAILED
    assert outcome.detail == (
        f"config writes blocked and enable failed: {Kernel(sim.root).device_dir(Bdf.parse(BDF))}"
        f"/enable: EIO ({os.strerror(errno.EIO)})"
    )
    assert outcome.command_after == 0x0006 and journal.entries == []


def test_an_enable_write_refused_under_lockdown_fails_with_the_command_as_it_is(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF, command=0x0007)], lockdown="integrity")
    sim.fail_write(BDF, "enable", errno.EIO)
    outcome, journal = clear(sim)
    assert outcome.status is Status.FAILED
    assert outcome.detail.startswith("config writes blocked and enable failed: ")
    assert f"{BDF}/enable: EIO (Input/output error)" in outcome.detail
    assert outcome.command_after == 0x0007 and journal.entries == []


@pytest.mark.parametrize("count", [1, 3])
def test_under_lockdown_the_enable_count_is_dropped_to_zero_and_journalled(
    make_sim: SimFactory, count: int
) -> None:
    sim = make_sim([SimFunction(BDF, enable_count=count, command=0x0407)], lockdown="integrity")
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.command_after, outcome.cleared_bus_master) == (
        Status.DONE,
        0x0403,
        True,
    )
    assert outcome.detail == (
        f"bus master cleared through enable (config writes blocked: EPERM; count {count} → 0)"
    )
    enables = [w["data"] for w in sim.writes() if w["path"].endswith("/enable")]
    assert enables == ["0"] * count
    assert journal.entries == [Undo(UndoKind.REENABLE, Bdf.parse(BDF), enable_count=count)]


def test_under_lockdown_a_count_of_zero_is_enabled_once_then_disabled(
    make_sim: SimFactory,
) -> None:
    # Bus master on with a count of 0 (firmware left it): nothing to give back on rollback.
    sim = make_sim([SimFunction(BDF, enable_count=0)], lockdown="integrity")
    outcome, journal = clear(sim)
    assert outcome.status is Status.DONE and not sim.bus_master_on(BDF)
    assert outcome.detail.endswith("count 0 → 0)")
    assert [w["data"] for w in sim.writes() if w["path"].endswith("/enable")] == ["1", "0"]
    assert journal.entries == []


class CountStuckAt(Kernel):
    """A kernel whose `enable` count does not go down (another user keeps it enabled)."""

    def read_enable_count(self, bdf: Bdf) -> int | None:
        return 2 if bdf == STEP.bdf else super().read_enable_count(bdf)


def test_under_lockdown_a_count_that_stays_above_zero_fails_and_is_still_journalled(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF, enable_count=5)], lockdown="integrity")
    stuck = CountStuckAt(sim.root, sim, sleep=lambda _seconds: None)
    outcome, journal = clear(sim, stuck)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        "config writes blocked; enable count still 2 after 2 disables",
    )
    assert outcome.command_after == sim.kernel.read_command(Bdf.parse(BDF))
    assert journal.entries == [Undo(UndoKind.REENABLE, Bdf.parse(BDF), enable_count=2)]


def test_a_cleared_step_is_journalled_with_the_command_to_restore(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(BDF, command=0x0407)])
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.DONE,
        "bus master cleared",
        0x0403,
    )
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0407)]


# -- what the first read of COMMAND finds ----------------------------------------------------


def test_a_function_gone_before_its_step_is_reported_gone_and_left_alone(
    make_sim: SimFactory,
) -> None:
    # Hot-removed (or removed through a parent's unbind) since discovery: its directory is gone.
    sim = make_sim([SimFunction(BDF), SimFunction("0000:00:06.0")])
    sim.vanish(BDF)
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.GONE,
        "function is gone",
        None,
    )
    assert not outcome.cleared_bus_master
    assert sim.writes() == [] and journal.entries == []


def test_config_that_cannot_be_read_on_a_present_function_fails_the_step(
    make_sim: SimFactory,
) -> None:
    # The function is there but its COMMAND cannot be read (here: no `config` to open): not
    # gone, and nothing to decide a write on, so nothing is written.
    sim = make_sim([SimFunction(BDF)])
    (sim.device_dir(BDF) / "config").unlink()
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.FAILED,
        "config space unreadable",
        None,
    )
    assert sim.writes() == [] and journal.entries == []


def test_config_reading_all_ones_is_gone_and_the_report_shows_what_was_read(
    make_sim: SimFactory,
) -> None:
    # Surprise-removed, link down or EEH-frozen: reads are all ones and a write would be
    # dropped; the JSON report's command_after says ffff.
    sim = make_sim([SimFunction(BDF)])
    sim.make_config_read_ffff(BDF)
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.GONE,
        "config reads 0xffff (gone, link down or frozen)",
        0xFFFF,
    )
    assert sim.writes() == [] and journal.entries == []


def test_bus_master_already_off_writes_nothing_and_keeps_the_command_it_read(
    make_sim: SimFactory,
) -> None:
    # command_after is what the read-back before the handoff compares with: a function left
    # with bus master off that has it on again then is caught (petitkexec.readback).
    sim = make_sim([SimFunction(BDF, command=0x0402)])
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.ALREADY,
        "bus master already off",
        0x0402,
    )
    assert not outcome.cleared_bus_master
    assert sim.writes() == [] and journal.entries == []


def test_a_config_write_refused_without_lockdown_fails_and_journals_nothing(
    make_sim: SimFactory,
) -> None:
    # Any errno but EPERM (lockdown) is the write's own failure: no `enable` fallback.
    sim = make_sim([SimFunction(BDF, command=0x0407)])
    sim.fail_write(BDF, "config", errno.EIO)
    outcome, journal = clear(sim)
    config = sim.kernel.device_dir(Bdf.parse(BDF)) / "config"
    assert (outcome.status, outcome.command_after) == (Status.FAILED, 0x0407)
    assert outcome.detail.startswith(f"config write refused: {config}: EIO (Input/output error)")
    assert sim.bus_master_on(BDF) and journal.entries == []
    assert not any(w["path"].endswith("/enable") for w in sim.writes())


# -- the read-back after the write -----------------------------------------------------------


def test_a_write_the_function_never_sees_is_a_failure_with_the_command_read_back(
    make_sim: SimFactory,
) -> None:
    # Platform accessors swallow write errors (pci_write_config() returns the byte count):
    # only the read-back tells. The write may yet have done something: still journalled.
    sim = make_sim([SimFunction(BDF, command=0x0407)])
    sim.drop_config_writes(BDF)
    outcome, journal = clear(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.FAILED,
        "bus master still on after write (COMMAND 0x0407)",
        0x0407,
    )
    assert not outcome.cleared_bus_master
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0407)]


@dataclass(frozen=True)
class LostAtTheWrite:
    """The simulated kernel, with the function lost as its COMMAND write lands: EEH freezes
    its partition on the error the write raised (config reads all ones from then on), or it
    is surprise-removed (its directory is gone)."""

    sim: SimKernel
    how: str  # "frozen" or "removed"

    def write(self, path: Path, data: bytes, offset: int | None = None) -> None:
        self.sim.write(path, data, offset)
        if path.name == "config":
            lose = self.sim.make_config_read_ffff if self.how == "frozen" else self.sim.vanish
            lose(path.parent.name)


@pytest.mark.parametrize(("how", "read_back"), [("frozen", 0xFFFF), ("removed", None)])
def test_a_function_lost_at_the_write_is_gone_not_failed(
    make_sim: SimFactory, how: str, read_back: int | None
) -> None:
    sim = make_sim([SimFunction(BDF, command=0x0407), SimFunction("0000:00:06.0")])
    kernel = Kernel(sim.root, LostAtTheWrite(sim, how), sleep=sim.sleep)
    outcome, journal = clear(sim, kernel)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.GONE,
        "bus master cleared, but the read-back failed (gone, link down or frozen)",
        read_back,
    )
    assert not outcome.cleared_bus_master
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0407)]


# -- after an unbind -------------------------------------------------------------------------

UNBIND = Step(Bdf.parse(BDF), Action.UNBIND, "e1000e, has unbind")


def unbind_in_process(sim: SimKernel) -> str:
    """The unbind as petitkexec.unbind does it (driver_override `none` first, so udev binds
    nothing again), here in this process: what after_unbind finds. Returns its `done`."""
    driver = sim.driver_of(BDF)
    assert driver is not None
    sim.kernel.set_driver_override(Bdf.parse(BDF), "none")
    sim.write(sim.root / "bus" / "pci" / "drivers" / driver / "unbind", BDF.encode())
    assert sim.driver_of(BDF) is None
    return f"unbound from {driver}"


def after_unbind(sim: SimKernel) -> tuple[StepOutcome, Journal]:
    done = unbind_in_process(sim)
    journal = Journal(undo_timeout_s=2)
    outcome = BusMasterClearer(sim.kernel, journal).after_unbind(UNBIND, done)
    assert outcome.step is UNBIND
    return outcome, journal


def test_a_driver_whose_remove_disabled_the_device_leaves_nothing_to_clear(
    make_sim: SimFactory,
) -> None:
    # pcim_enable_device(): the devres release calls pci_disable_device(); the count reaches
    # 0 and bus master is cleared. Done by the unbind, not by us: not in bus_master_cleared.
    sim = make_sim([SimFunction(BDF, driver="e1000e", command=0x0406, remove_clears_master=True)])
    outcome, journal = after_unbind(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.DONE,
        "unbound from e1000e; bus master off",
        0x0402,
    )
    assert not outcome.cleared_bus_master and journal.entries == []


@pytest.mark.parametrize(
    "function",
    [
        SimFunction(BDF, driver="e1000e", command=0x0406),  # no managed enable
        # pcieport on q35: the enable count stays above 0 after its remove()
        SimFunction(
            BDF, driver="e1000e", command=0x0406, enable_count=2, remove_clears_master=True
        ),
    ],
    ids=["remove-leaves-it", "count-stays-above-0"],
)
def test_bus_master_a_driver_left_on_is_cleared_and_counted_as_cleared(
    make_sim: SimFactory, function: SimFunction
) -> None:
    sim = make_sim([function])
    outcome, journal = after_unbind(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.DONE,
        "unbound from e1000e; driver left bus master on: bus master cleared",
        0x0402,
    )
    assert outcome.cleared_bus_master  # the summary's bus_master_cleared lists it
    assert not sim.bus_master_on(BDF)
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0406)]


def test_an_unbound_function_frozen_after_its_remove_is_gone_with_what_it_read(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF, driver="e1000e", command=0x0406)])
    done = unbind_in_process(sim)
    sim.make_config_read_ffff(BDF)  # EEH froze the partition during remove()
    outcome = BusMasterClearer(sim.kernel, Journal(undo_timeout_s=2)).after_unbind(UNBIND, done)
    assert outcome.step is UNBIND
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.GONE,
        "unbound from e1000e; config reads 0xffff (gone, link down or frozen)",
        0xFFFF,
    )
    assert not outcome.cleared_bus_master


def test_an_unbound_function_whose_config_write_is_refused_fails_with_bus_master_on(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF, driver="e1000e", command=0x0406)])
    sim.fail_write(BDF, "config", errno.EIO)
    outcome, journal = after_unbind(sim)
    assert (outcome.status, outcome.command_after) == (Status.FAILED, 0x0406)
    assert outcome.detail.startswith("unbound from e1000e; config write refused: ")
    assert not outcome.cleared_bus_master and journal.entries == []


# -- holding off probes ----------------------------------------------------------------------


def hold_off(sim: SimKernel, step: Step = STEP) -> tuple[StepOutcome, StepOutcome, Journal]:
    """A bus-master clear and the hold-off after it, as petitkexec.execute runs them."""
    journal = Journal(undo_timeout_s=2)
    clearer = BusMasterClearer(sim.kernel, journal)
    cleared = clearer.clear(step)
    return cleared, clearer.hold_off_probes(cleared), journal


@pytest.mark.parametrize("command", [0x0406, 0x0402], ids=["cleared", "already-off"])
def test_a_quiet_function_without_driver_gets_driver_override_none(
    make_sim: SimFactory, command: int
) -> None:
    # udev's modprobe, a module load or a deferred probe would bind it before the kexec and
    # probe turns bus mastering back on (pci_set_master()); `none` matches no driver.
    sim = make_sim([SimFunction(BDF, command=command)])
    cleared, held, journal = hold_off(sim)
    assert held is cleared  # the step's outcome as it was
    assert sim.attribute(BDF, "driver_override") == "none"
    assert sim.late_probe(BDF, "e1000e") is None and not sim.bus_master_on(BDF)
    assert journal.entries[-1] == Undo(
        UndoKind.RESTORE_OVERRIDE, Bdf.parse(BDF), driver_override=None
    )


def test_the_override_a_driverless_function_had_is_what_the_rollback_puts_back(
    make_sim: SimFactory,
) -> None:
    # An administrator's `vfio-pci` on a function whose vfio-pci is not loaded yet.
    sim = make_sim([SimFunction(BDF, command=0x0402)])
    sim.kernel.set_driver_override(Bdf.parse(BDF), "vfio-pci")
    _cleared, _held, journal = hold_off(sim)
    assert sim.attribute(BDF, "driver_override") == "none"
    assert journal.entries == [
        Undo(UndoKind.RESTORE_OVERRIDE, Bdf.parse(BDF), driver_override="vfio-pci")
    ]
    assert all(result.ok for result in journal.rollback(sim.kernel))
    assert sim.attribute(BDF, "driver_override") == "vfio-pci"


def test_an_override_already_none_is_not_written_again_nor_journalled(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(BDF, command=0x0402)])
    sim.kernel.set_driver_override(Bdf.parse(BDF), "none")
    before = len(sim.writes())
    _cleared, _held, journal = hold_off(sim)
    assert sim.writes()[before:] == [] and journal.entries == []
    assert sim.attribute(BDF, "driver_override") == "none"


def test_a_function_with_a_driver_bound_keeps_its_override(make_sim: SimFactory) -> None:
    # Bound (e.g. a driver that cannot be unbound): `none` would only stop it binding again
    # after a rollback; at kexec its driver's shutdown() runs anyway.
    sim = make_sim([SimFunction(BDF, driver="lpc_ich", can_unbind=False, command=0x0407)])
    cleared, held, journal = hold_off(sim)
    assert held is cleared and cleared.status is Status.DONE
    assert sim.attribute(BDF, "driver_override") == "(null)"
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0407)]


def test_a_step_that_did_not_quiet_the_function_gets_no_override(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(BDF, command=0x0407)])
    sim.drop_config_writes(BDF)  # bus master still on: FAILED
    cleared, held, _journal = hold_off(sim)
    assert held is cleared and cleared.status is Status.FAILED
    assert sim.attribute(BDF, "driver_override") == "(null)"


def test_a_refused_driver_override_is_said_in_the_detail_and_not_journalled(
    make_sim: SimFactory,
) -> None:
    # Not a failure of the step: bus master is off, and the read-back before the handoff
    # still looks at the function.
    sim = make_sim([SimFunction(BDF, command=0x0407)])
    sim.fail_write(BDF, "driver_override", errno.EIO)
    _cleared, held, journal = hold_off(sim)
    override = sim.kernel.device_dir(Bdf.parse(BDF)) / "driver_override"
    assert (held.status, held.command_after, held.cleared_bus_master) == (
        Status.DONE,
        0x0403,
        True,
    )
    assert held.detail.startswith(
        f"bus master cleared; driver_override not set: {override}: EIO (Input/output error)"
    )
    assert held.step is STEP
    assert journal.entries == [Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(BDF), command=0x0407)]
