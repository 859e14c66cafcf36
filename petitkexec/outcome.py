"""What each step achieved (or will, once its child answers), and the report of a teardown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.deadline import Child, ChildResult
from petitkexec.errors import ExitCode
from petitkexec.journal import UndoResult
from petitkexec.model import bus_master_of
from petitkexec.plan import Action, Step


class Status(Enum):
    DONE = "done"
    ALREADY = "already"  # nothing needed doing
    HELD = "held"  # protect, keep or skip: not touched by design
    GONE = "gone"  # the function vanished or reads 0xffff
    FAILED = "failed"
    HUNG = "hung"  # an unbind did not return before its deadline
    WOULD = "would"  # --dry-run


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, how long it took, and how the function was left."""

    step: Step
    status: Status
    detail: str
    elapsed_ms: float = 0.0
    driver_after: str | None = None
    command_after: int | None = None  # PCI_COMMAND read back after the step
    cleared_bus_master: bool = False  # this step turned bus master off

    @property
    def bus_master_after(self) -> bool | None:
        return bus_master_of(self.command_after)


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Pending:
    """A step whose blocking kernel call runs in `child`; `finish` reads its result."""

    step: Step
    child: Child
    began: float
    finish: Callable[[ChildResult], StepOutcome]


@dataclass(frozen=True)
class TeardownReport:
    """Every step's outcome, and how the run as a whole ended."""

    outcomes: tuple[StepOutcome, ...]
    stopped_because: str | None = None  # a hung unbind or a signal ended the run early
    hung: tuple[Bdf, ...] = ()
    interrupted: bool = False
    rollback: tuple[UndoResult, ...] = ()
    wall_ms: float = 0.0
    # The dependent steps whose times add up the most, (step, elapsed ms) in order: what no
    # number of --jobs can make faster.
    critical_path: tuple[tuple[str, float], ...] = ()

    @property
    def critical_path_ms(self) -> float:
        return round(sum(ms for _step, ms in self.critical_path), 1)

    @property
    def failed(self) -> tuple[StepOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status in (Status.FAILED, Status.HUNG))

    @property
    def exit_code(self) -> ExitCode:
        if self.hung:
            return ExitCode.HUNG
        if self.interrupted:
            return ExitCode.INTERRUPTED
        # A time limit that ended the run early left some steps undone: partial, like a failure.
        partial = self.failed or self.stopped_because is not None
        return ExitCode.TEARDOWN_PARTIAL if partial else ExitCode.OK

    @property
    def handoff_safe(self) -> bool:
        """A run stopped early never hands off: a stuck remove() holds the device lock that
        device_shutdown() at kexec takes too, a signal asked to stop, and a time limit left
        the machine half torn down (and rolled back, unless --no-rollback)."""
        return self.stopped_because is None

    def summary(self) -> dict[str, list[str]]:
        """Per-device results, by what was achieved."""
        groups: dict[str, list[str]] = {name: [] for name in SUMMARY_GROUPS}
        for outcome in self.outcomes:
            bdf = str(outcome.step.bdf)
            group = _summary_group(outcome)
            if group is not None:
                groups[group].append(bdf)
            if outcome.cleared_bus_master:
                groups["bus_master_cleared"].append(bdf)
        return groups


SUMMARY_GROUPS = (
    "unbound",
    "bus_master_cleared",
    "reset",
    "protected",
    "kept",
    "skipped",
    "gone",
    "failed",
    "would_change",
)
_GROUP_OF_ACTION = {
    Action.PROTECT: "protected",
    Action.KEEP: "kept",
    Action.SKIP: "skipped",
    Action.UNBIND: "unbound",
    Action.RESET_BUS: "reset",
}


def _summary_group(outcome: StepOutcome) -> str | None:
    """The one group a step's outcome counts in; a clear-bus-master counts by its flag."""
    if outcome.status in (Status.FAILED, Status.HUNG):
        return "failed"
    if outcome.status is Status.GONE:
        return "gone"
    if outcome.status is Status.ALREADY:
        return "skipped"
    if outcome.status is Status.WOULD:
        return "would_change"
    return _GROUP_OF_ACTION.get(outcome.step.action)
