"""Carry out a plan: each step as soon as what it depends on is done, independent ones side by
side; a report with the wall time and the critical path at the end."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from petitkexec.busmaster import BusMasterClearer
from petitkexec.busreset import BusResetter
from petitkexec.deadline import Budget, Child, wait_first
from petitkexec.journal import Journal, UndoResult
from petitkexec.kernel import Kernel
from petitkexec.model import Topology
from petitkexec.outcome import Pending, Status, StepOutcome, TeardownReport
from petitkexec.plan import Action, Plan, Step
from petitkexec.readback import read_back
from petitkexec.settings import MAX_AUTO_JOBS, ExecutionOptions
from petitkexec.signals import StopSignals
from petitkexec.unbind import Unbinder

OutcomeCallback = Callable[[int, int, StepOutcome], None]


@dataclass
class Teardown:
    kernel: Kernel
    topology: Topology
    plan: Plan
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    on_outcome: OutcomeCallback | None = None
    # Installed for the step loop; a caller (petitkexec.run) installs the same object for the
    # whole run, handoff and rollback included.
    signals: StopSignals = field(default_factory=StopSignals)

    @property
    def interrupted_by(self) -> str | None:
        return self.signals.first

    def __post_init__(self) -> None:
        # A rebind runs probe() as an unbind runs remove(): the same deadline suits both.
        self.journal = Journal(undo_timeout_s=self.options.unbind_timeout_s)
        self.budget = Budget.of(self.options.time_limit_s)
        self.bus_master = BusMasterClearer(self.kernel, self.journal)
        self.unbinder = Unbinder(
            self.kernel, self.journal, self.bus_master, self.options.unbind_timeout_s, self.budget
        )
        self.resetter = BusResetter(
            self.kernel,
            self.topology,
            self.options.reset_timeout_s,
            self.options.raw_sbr,
            self.budget,
        )

    def run(self) -> TeardownReport:
        """Every step starts as soon as the steps below it have finished (a PF after its VFs,
        a bridge after everything below it, a reset after the bridge), up to `jobs` children
        at a time: a slow remove() delays only what sits above it."""
        outcomes: list[StepOutcome] = []
        steps = self.plan.steps
        waiting_for = dependencies(self.topology, steps)
        dependents: dict[int, list[int]] = {i: [] for i in range(len(steps))}
        for index, needs in waiting_for.items():
            for need in needs:
                dependents[need].append(index)
        ready = sorted(i for i, needs in waiting_for.items() if not needs)
        jobs = self.options.jobs or min(
            MAX_AUTO_JOBS, max(1, sum(1 for step in steps if self._runs_in_a_child(step)))
        )
        running: dict[Child, tuple[int, Pending]] = {}
        busy_slots: set[tuple[int, int, int]] = set()
        began = time.monotonic()

        def finish(index: int, outcome: StepOutcome) -> None:
            outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(len(outcomes), len(steps), outcome)
            for dependent in dependents[index]:
                waiting_for[dependent].discard(index)
                if not waiting_for[dependent]:
                    bisect.insort(ready, dependent)

        with self.signals.installed():
            try:
                while ready or running:
                    for index in list(ready):
                        if self._should_stop(outcomes):
                            break
                        step = steps[index]
                        if not self._runs_in_a_child(step):
                            ready.remove(index)
                            finish(index, self._timed(step))
                            continue
                        if len(running) >= jobs or step.bdf.slot in busy_slots:
                            continue  # the functions of one device one at a time
                        ready.remove(index)
                        started = self._begin(step)
                        if isinstance(started, StepOutcome):
                            finish(index, self._with_elapsed(started, time.monotonic()))
                        else:
                            running[started.child] = (index, started)
                            busy_slots.add(step.bdf.slot)
                    if self._should_stop(outcomes):
                        ready.clear()
                    if running:
                        child, result = wait_first(running)
                        index, pending = running.pop(child)
                        busy_slots.discard(steps[index].bdf.slot)
                        finish(index, self._with_elapsed(pending.finish(result), pending.began))
            except BaseException:
                self._settle(running)
                raise
            return self._report(outcomes, time.monotonic() - began)

    @staticmethod
    def _settle(running: dict[Child, tuple[int, Pending]]) -> None:
        """An exception left the loop with unbinds still running: each is waited for up to
        its deadline and journalled (an abandoned one too, with its child), so the rollback
        that follows neither races a remove() nor claims a device it cannot restore."""
        while running:
            child, result = wait_first(running)
            _index, pending = running.pop(child)
            with contextlib.suppress(Exception):  # the error that stopped the loop is reported
                pending.finish(result)

    def _report(self, outcomes: list[StepOutcome], wall_s: float) -> TeardownReport:
        stopped_because = None
        hung = tuple(o for o in outcomes if o.status is Status.HUNG)
        if hung:
            stopped_because = "; ".join(
                f"{o.step.action.value} of {o.step.bdf}: {o.detail}" for o in hung
            )
        elif self.interrupted_by is not None:
            stopped_because = f"interrupted by {self.interrupted_by}"
        elif len(outcomes) < len(self.plan.steps) and self.budget.exhausted:
            stopped_because = f"time limit of {self.options.time_limit_s:g} s reached"
        rollback: tuple[UndoResult, ...] = ()
        if stopped_because is not None:
            rollback = self.rollback()
        return TeardownReport(
            tuple(outcomes),
            stopped_because,
            tuple(o.step.bdf for o in hung),
            self.interrupted_by is not None,
            rollback,
            wall_ms=round(wall_s * 1000, 1),
            critical_path=critical_path(self.topology, self.plan.steps, outcomes),
        )

    def _runs_in_a_child(self, step: Step) -> bool:
        return step.action in (Action.UNBIND, Action.RESET_BUS) and not self.options.dry_run

    def _begin(self, step: Step) -> StepOutcome | Pending:
        if step.action is Action.UNBIND:
            return self.unbinder.begin(step)
        return self.resetter.begin(step)

    @staticmethod
    def _with_elapsed(outcome: StepOutcome, began: float) -> StepOutcome:
        elapsed_ms = round((time.monotonic() - began) * 1000, 2)
        return dataclasses.replace(outcome, elapsed_ms=elapsed_ms)

    def _should_stop(self, outcomes: list[StepOutcome]) -> bool:
        hung = any(outcome.status is Status.HUNG for outcome in outcomes)
        return hung or self.interrupted_by is not None or self.budget.exhausted

    def rollback(self) -> tuple[UndoResult, ...]:
        """The journal undone, unless --no-rollback: then nothing is, on any path."""
        if not self.options.rollback:
            return ()
        with self.signals.installed():  # a signal now is recorded, never cuts it short
            return tuple(self.journal.rollback(self.kernel))

    def read_back(self, report: TeardownReport) -> TeardownReport:
        """Right before the handoff: what a late probe or a COMMAND write brought back is a
        failed step; bus mastering on again that cannot be cleared stops the run
        (petitkexec.readback)."""
        if self.options.dry_run or report.stopped_because is not None:
            return report
        looked = read_back(self.kernel, self.topology, self.bus_master, report.outcomes)
        if not looked.came_back:
            return report
        if looked.stop_because is None:
            return dataclasses.replace(report, outcomes=looked.outcomes)
        return dataclasses.replace(
            report,
            outcomes=looked.outcomes,
            stopped_because=looked.stop_because,
            rollback=self.rollback(),
        )

    def stop_if_signalled(self, report: TeardownReport) -> TeardownReport:
        """A stop signal that came after the step loop (the read-back, the handoff's
        preparations): the run is stopped and rolled back as if it came during the loop."""
        if self.interrupted_by is None or report.interrupted:
            return report
        return dataclasses.replace(
            report,
            stopped_because=f"interrupted by {self.interrupted_by}",
            interrupted=True,
            rollback=report.rollback + self.rollback(),
        )

    def _timed(self, step: Step) -> StepOutcome:
        began = time.monotonic()
        return self._with_elapsed(self._run_step(step), began)

    def _run_step(self, step: Step) -> StepOutcome:
        """A step `_runs_in_a_child` refuses: held, a dry run's, or a bus-master clear (a
        config-space write; only remove() and a reset can block, so only they get a child)."""
        if not step.action.mutates:
            return StepOutcome(step, Status.HELD, step.reason)
        if self.options.dry_run:
            return StepOutcome(
                step,
                Status.WOULD,
                str(step),
                driver_after=self.kernel.driver(step.bdf),
                command_after=self.kernel.read_command(step.bdf),
            )
        return self.bus_master.hold_off_probes(self.bus_master.clear(step))


def dependencies(topology: Topology, steps: tuple[Step, ...]) -> dict[int, set[int]]:
    """For each step, the steps that must finish first, by index.

    The kernel's reasons: unbinding a PF removes its VFs (VFs first); unbinding a bridge's
    pcieport disables the port and cuts DMA below it (everything below first); a bus reset
    restores config as saved, so it comes after its bridge's subtree. Resets wait for every
    other step, then run side by side: on PowerNV each is an OPAL call that holds a CPU for
    seconds (pnv_pci_reset_secondary_bus), and overlapping them with unbinds still running
    elsewhere made the powernv9 guest's teardown slower (13.5 s against about 10 s)."""
    decision_of = {
        step.bdf: i for i, step in enumerate(steps) if step.action is not Action.RESET_BUS
    }
    everything_else = set(decision_of.values())
    needs: dict[int, set[int]] = {}
    for index, step in enumerate(steps):
        if step.action is Action.RESET_BUS:
            needs[index] = set(everything_else)
            continue
        below = [*topology.children(step.bdf), *topology.vfs(step.bdf)]
        needs[index] = {decision_of[bdf] for bdf in below if bdf in decision_of} - {index}
    return needs


def critical_path(
    topology: Topology, steps: tuple[Step, ...], outcomes: list[StepOutcome]
) -> tuple[tuple[str, float], ...]:
    """The chain of dependent steps whose times add up the most: what no number of --jobs
    can make faster. (step, elapsed ms) from the first to the last."""
    index_of = {(o.step.bdf, o.step.action): i for i, o in enumerate(outcomes)}
    plan_index = {id(step): i for i, step in enumerate(steps)}  # outcomes carry the plan's steps
    needs = dependencies(topology, steps)
    best: dict[int, tuple[float, tuple[tuple[str, float], ...]]] = {}
    for position, outcome in enumerate(outcomes):  # in completion order: needs come first
        step_index = plan_index[id(outcome.step)]
        before = [
            best[index_of[(steps[n].bdf, steps[n].action)]]
            for n in needs[step_index]
            if (steps[n].bdf, steps[n].action) in index_of
        ]
        total, chain = max(before, default=(0.0, ()))
        label = f"{outcome.step.action.value} {outcome.step.bdf}"
        best[position] = (total + outcome.elapsed_ms, (*chain, (label, outcome.elapsed_ms)))
    return max(best.values(), default=(0.0, ()))[1]
