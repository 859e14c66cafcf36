"""What each step achieved, and the report of a whole teardown."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.journal import UndoResult
from petitkexec.model import CONFIG_GONE, PCI_COMMAND_MASTER
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
    step: Step
    status: Status
    detail: str
    elapsed_ms: float = 0.0
    driver_after: str | None = None
    command_after: int | None = None  # PCI_COMMAND read back after the step
    cleared_bus_master: bool = False  # this step turned bus master off

    @property
    def bus_master_after(self) -> bool | None:
        if self.command_after is None or self.command_after == CONFIG_GONE:
            return None
        return bool(self.command_after & PCI_COMMAND_MASTER)


@dataclass(frozen=True)
class TeardownReport:
    outcomes: tuple[StepOutcome, ...]
    stopped_because: str | None = None  # a hung unbind or a signal ended the run early
    hung: tuple[Bdf, ...] = ()
    interrupted: bool = False
    rollback: tuple[UndoResult, ...] = ()

    @property
    def failed(self) -> tuple[StepOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status in (Status.FAILED, Status.HUNG))

    @property
    def handoff_safe(self) -> bool:
        """A stuck remove() holds the device lock that device_shutdown() at kexec takes too."""
        return not self.hung and not self.interrupted

    def summary(self) -> dict[str, list[str]]:
        """Per-device results, by what was achieved."""
        groups: dict[str, list[str]] = {
            name: []
            for name in (
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
        }
        for outcome in self.outcomes:
            bdf, action, status = str(outcome.step.bdf), outcome.step.action, outcome.status
            if status in (Status.FAILED, Status.HUNG):
                groups["failed"].append(bdf)
            elif status is Status.GONE:
                groups["gone"].append(bdf)
            elif action is Action.PROTECT:
                groups["protected"].append(bdf)
            elif action is Action.KEEP:
                groups["kept"].append(bdf)
            elif action is Action.SKIP or status is Status.ALREADY:
                groups["skipped"].append(bdf)
            elif status is Status.WOULD:
                groups["would_change"].append(bdf)
            elif action is Action.UNBIND:
                groups["unbound"].append(bdf)
            elif action is Action.RESET_BUS:
                groups["reset"].append(bdf)
            if outcome.cleared_bus_master:
                groups["bus_master_cleared"].append(bdf)
        return groups
