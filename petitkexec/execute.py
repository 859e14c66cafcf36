"""Carry out a plan: waves in order, slow steps of a wave side by side, a report at the end."""

from __future__ import annotations

import dataclasses
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from petitkexec.busmaster import BusMasterClearer
from petitkexec.busreset import BusResetter
from petitkexec.deadline import Budget, Child, wait_first
from petitkexec.journal import Journal, UndoResult
from petitkexec.kernel import Kernel
from petitkexec.model import Topology
from petitkexec.outcome import Pending, Status, StepOutcome, TeardownReport
from petitkexec.plan import Action, Plan, Step
from petitkexec.settings import ExecutionOptions
from petitkexec.unbind import Unbinder

OutcomeCallback = Callable[[int, int, StepOutcome], None]


@dataclass
class Teardown:
    kernel: Kernel
    topology: Topology
    plan: Plan
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    on_outcome: OutcomeCallback | None = None
    interrupted_by: str | None = None

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
        outcomes: list[StepOutcome] = []
        stopped_because = None
        with self._signals_stop_the_run():
            for _wave, group in itertools.groupby(self.plan.steps, key=lambda step: step.wave):
                if self.interrupted_by is not None or self.budget.exhausted:
                    break
                for outcome in self._run_wave(list(group)):
                    outcomes.append(outcome)
                    if self.on_outcome is not None:
                        self.on_outcome(len(outcomes), len(self.plan.steps), outcome)
                if any(outcome.status is Status.HUNG for outcome in outcomes):
                    break
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
        if stopped_because is not None and self.options.rollback:
            rollback = tuple(self.journal.rollback(self.kernel))
        return TeardownReport(
            tuple(outcomes),
            stopped_because,
            tuple(o.step.bdf for o in hung),
            self.interrupted_by is not None,
            rollback,
        )

    def _run_wave(self, steps: list[Step]) -> list[StepOutcome]:
        """Unbinds and resets side by side (one at a time per multi-function slot, at most
        `jobs`), then the quick steps; no new step starts after a hang or a signal."""
        results: dict[int, StepOutcome] = {}
        slow = [
            i
            for i, step in enumerate(steps)
            if step.action in (Action.UNBIND, Action.RESET_BUS) and not self.options.dry_run
        ]
        running: dict[Child, tuple[int, Pending]] = {}
        busy_slots: set[tuple[int, int, int]] = set()
        while slow or running:
            if self._should_stop(results):
                slow.clear()
            for i in list(slow):
                if len(running) >= self.options.jobs:
                    break
                if steps[i].bdf.slot in busy_slots:
                    continue
                slow.remove(i)
                started = self._begin(steps[i])
                if isinstance(started, StepOutcome):
                    results[i] = self._with_elapsed(started, time.monotonic())
                else:
                    running[started.child] = (i, started)
                    busy_slots.add(steps[i].bdf.slot)
            if running:
                child, result = wait_first(running)
                i, pending = running.pop(child)
                busy_slots.discard(steps[i].bdf.slot)
                results[i] = self._with_elapsed(pending.finish(result), pending.began)
        for i, step in enumerate(steps):
            if i not in results and not self._should_stop(results):
                results[i] = self._timed(step)
        return [results[i] for i in sorted(results)]

    def _begin(self, step: Step) -> StepOutcome | Pending:
        if step.action is Action.UNBIND:
            return self.unbinder.begin(step)
        return self.resetter.begin(step)

    @staticmethod
    def _with_elapsed(outcome: StepOutcome, began: float) -> StepOutcome:
        elapsed_ms = round((time.monotonic() - began) * 1000, 2)
        return dataclasses.replace(outcome, elapsed_ms=elapsed_ms)

    def _should_stop(self, results: dict[int, StepOutcome]) -> bool:
        hung = any(outcome.status is Status.HUNG for outcome in results.values())
        return hung or self.interrupted_by is not None or self.budget.exhausted

    @contextmanager
    def _signals_stop_the_run(self) -> Iterator[None]:
        """SIGINT/SIGTERM: finish the step in flight, issue no more, roll back."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            self.interrupted_by = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _timed(self, step: Step) -> StepOutcome:
        began = time.monotonic()
        return self._with_elapsed(self._run_step(step), began)

    def _run_step(self, step: Step) -> StepOutcome:
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
        if step.action is Action.CLEAR_BUS_MASTER:
            return self.bus_master.clear(step)
        return self._wait(self._begin(step))

    def _wait(self, started: StepOutcome | Pending) -> StepOutcome:
        """One step's child, waited for alone (the one-at-a-time path)."""
        if isinstance(started, StepOutcome):
            return started
        return started.finish(wait_first([started.child])[1])
