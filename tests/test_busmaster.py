"""Clearing bus master through config space, and through `enable` when integrity lockdown
refuses config writes (EPERM): every outcome, what it leaves behind and what it journals."""

from __future__ import annotations

import errno
import os

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
