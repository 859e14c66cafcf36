"""A teardown's report (petitkexec.outcome): which steps count as failed, the exit code and
whether a handoff is safe, the per-device summary and the critical path."""

from __future__ import annotations

import pytest

from petitkexec.bdf import Bdf
from petitkexec.errors import ExitCode
from petitkexec.outcome import SUMMARY_GROUPS, Status, StepOutcome, TeardownReport
from petitkexec.plan import Action, Step


def done(
    bdf: str, action: Action = Action.UNBIND, status: Status = Status.DONE, **kwargs: object
) -> StepOutcome:
    return StepOutcome(Step(Bdf.parse(bdf), action, "why"), status, "detail", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "bus_master"),
    [(None, None), (0xFFFF, None), (0x0406, True), (0x0402, False), (0x0004, True)],
)
def test_bus_master_after_is_read_from_command(command: int | None, bus_master: bool) -> None:
    assert done("0000:00:03.0", command_after=command).bus_master_after is bus_master


def test_failed_steps_are_the_failed_and_the_hung_ones() -> None:
    failed, hung = (
        done("0000:00:04.0", status=Status.FAILED),
        done("0000:00:05.0", status=Status.HUNG),
    )
    others = [
        done("0000:00:03.0", status=status)
        for status in Status
        if status not in (Status.FAILED, Status.HUNG)
    ]
    report = TeardownReport((others[0], failed, *others[1:], hung))
    assert report.failed == (failed, hung)
    assert TeardownReport(tuple(others)).failed == ()


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (TeardownReport(()), ExitCode.OK),
        (TeardownReport((done("0000:00:03.0", status=Status.GONE),)), ExitCode.OK),
        (TeardownReport((done("0000:00:03.0", status=Status.FAILED),)), ExitCode.TEARDOWN_PARTIAL),
        (TeardownReport((), stopped_because="time limit ran out"), ExitCode.TEARDOWN_PARTIAL),
        # A hang wins over a signal, a signal over failures.
        (
            TeardownReport(
                (done("0000:00:03.0", status=Status.HUNG),),
                stopped_because="hung",
                hung=(Bdf.parse("0000:00:03.0"),),
                interrupted=True,
            ),
            ExitCode.HUNG,
        ),
        (
            TeardownReport(
                (done("0000:00:03.0", status=Status.FAILED),),
                stopped_because="interrupted by SIGTERM",
                interrupted=True,
            ),
            ExitCode.INTERRUPTED,
        ),
    ],
)
def test_the_exit_code_says_the_worst_that_happened(report: TeardownReport, code: ExitCode) -> None:
    assert report.exit_code is code


def test_only_a_run_that_was_not_stopped_hands_off() -> None:
    failed = done("0000:00:03.0", status=Status.FAILED)
    assert TeardownReport((failed,)).handoff_safe  # a failed step is reported, not a hang
    assert not TeardownReport((), stopped_because="time limit ran out").handoff_safe


def test_the_critical_path_adds_up_to_a_tenth_of_a_millisecond() -> None:
    report = TeardownReport(
        (), critical_path=(("unbind 0000:01:00.0", 12.34), ("unbind 0000:00:02.0", 0.02))
    )
    assert report.critical_path_ms == 12.4
    assert TeardownReport(()).critical_path_ms == 0


def test_the_summary_puts_each_device_in_the_group_of_what_it_achieved() -> None:
    report = TeardownReport(
        (
            done("0000:00:01.0", cleared_bus_master=True),  # an unbind that also cleared BME
            done("0000:00:02.0", Action.CLEAR_BUS_MASTER, cleared_bus_master=True),
            done("0000:00:03.0", Action.RESET_BUS),
            done("0000:00:04.0", Action.PROTECT, Status.HELD),
            done("0000:00:05.0", Action.KEEP, Status.HELD),
            done("0000:00:06.0", Action.SKIP, Status.HELD),
            done("0000:00:07.0", status=Status.ALREADY),
            done("0000:00:08.0", status=Status.GONE),
            done("0000:00:09.0", status=Status.FAILED),
            done("0000:00:0a.0", Action.RESET_BUS, Status.HUNG),
            done("0000:00:0b.0", status=Status.WOULD),
            done("0000:00:0c.0", Action.CLEAR_BUS_MASTER),  # nothing to clear: no group
        )
    )
    assert report.summary() == {
        "unbound": ["0000:00:01.0"],
        "bus_master_cleared": ["0000:00:01.0", "0000:00:02.0"],
        "reset": ["0000:00:03.0"],
        "protected": ["0000:00:04.0"],
        "kept": ["0000:00:05.0"],
        "skipped": ["0000:00:06.0", "0000:00:07.0"],
        "gone": ["0000:00:08.0"],
        "failed": ["0000:00:09.0", "0000:00:0a.0"],
        "would_change": ["0000:00:0b.0"],
    }
    assert list(report.summary()) == list(SUMMARY_GROUPS)  # every group, in this order
