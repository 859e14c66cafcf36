"""Carry out a plan against the kernel, step by step, recording how to undo each change."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from types import FrameType

from petitkexec.bdf import Bdf
from petitkexec.deadline import Child, ChildResult, wait_first
from petitkexec.errors import KernelWriteFailed
from petitkexec.journal import Journal, Undo, UndoKind, UndoResult
from petitkexec.kernel import Kernel
from petitkexec.model import (
    CONFIG_GONE,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_COMMAND_MASTER,
    Topology,
)
from petitkexec.plan import Action, Plan, Step

# Secondary bus reset timing as the kernel does it (pci_reset_secondary_bus(),
# pci_bridge_wait_for_secondary_bus()): hold reset ≥ 1 ms (spec Trst), then ≥ 100 ms before
# the first config access, then devices get up to 1 s to answer.
SBR_ASSERT_S = 0.002
SBR_SETTLE_S = 0.1
SBR_ANSWER_DEADLINE_S = 1.0
DEFAULT_UNBIND_TIMEOUT_S = 5.0
DEFAULT_JOBS = 8
# The kernel itself waits up to 60 s for devices answering CRS after a reset.
RESET_TIMEOUT_S = 75.0


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

    @property
    def bus_master_after(self) -> bool | None:
        if self.command_after is None or self.command_after == CONFIG_GONE:
            return None
        return bool(self.command_after & PCI_COMMAND_MASTER)


@dataclass(frozen=True)
class ExecutionOptions:
    unbind_timeout_s: float = DEFAULT_UNBIND_TIMEOUT_S
    # Independent devices' remove() calls run side by side (at most this many at once): a
    # remove() that waits for hardware (NVMe, NICs) costs its own time, not everyone's.
    jobs: int = DEFAULT_JOBS
    raw_sbr: bool = False
    dry_run: bool = False


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
                "not_run",
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
                groups["not_run"].append(bdf)
            elif action is Action.UNBIND:
                groups["unbound"].append(bdf)
                if "cleared" in outcome.detail:
                    groups["bus_master_cleared"].append(bdf)
            elif action is Action.CLEAR_BUS_MASTER:
                groups["bus_master_cleared"].append(bdf)
            elif action is Action.RESET_BUS:
                groups["reset"].append(bdf)
        return groups


OutcomeCallback = Callable[[int, int, StepOutcome], None]


@dataclass(frozen=True)
class _Pending:
    """A step whose blocking kernel call runs in `child`; `finish` reads its result."""

    step: Step
    child: Child
    began: float
    finish: Callable[[ChildResult], StepOutcome]


@dataclass
class Teardown:
    kernel: Kernel
    topology: Topology
    plan: Plan
    options: ExecutionOptions = field(default_factory=ExecutionOptions)
    journal: Journal = field(default_factory=Journal)
    on_outcome: OutcomeCallback | None = None
    interrupted_by: str | None = None

    def run(self) -> TeardownReport:
        outcomes: list[StepOutcome] = []
        stopped_because = None
        with self._signals_stop_the_run():
            for _wave, group in itertools.groupby(self.plan.steps, key=lambda step: step.wave):
                if self.interrupted_by is not None:
                    break
                for outcome in self._run_wave(list(group)):
                    outcomes.append(outcome)
                    if self.on_outcome is not None:
                        self.on_outcome(len(outcomes), len(self.plan.steps), outcome)
                if any(outcome.status is Status.HUNG for outcome in outcomes):
                    break
        hung = tuple(o.step.bdf for o in outcomes if o.status is Status.HUNG)
        if hung:
            stopped_because = (
                f"unbind of {', '.join(map(str, hung))} did not return within "
                f"{self.options.unbind_timeout_s:g} s"
            )
        elif self.interrupted_by is not None:
            stopped_because = f"interrupted by {self.interrupted_by}"
        rollback: tuple[UndoResult, ...] = ()
        if stopped_because is not None:
            rollback = tuple(self.journal.rollback(self.kernel))
        return TeardownReport(
            tuple(outcomes), stopped_because, hung, self.interrupted_by is not None, rollback
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
        running: dict[Child, tuple[int, _Pending]] = {}
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

    def _begin(self, step: Step) -> StepOutcome | _Pending:
        if step.action is Action.UNBIND:
            return self._begin_unbind(step)
        return self._begin_reset(step)

    @staticmethod
    def _with_elapsed(outcome: StepOutcome, began: float) -> StepOutcome:
        elapsed_ms = round((time.monotonic() - began) * 1000, 2)
        return dataclasses.replace(outcome, elapsed_ms=elapsed_ms)

    def _should_stop(self, results: dict[int, StepOutcome]) -> bool:
        hung = any(outcome.status is Status.HUNG for outcome in results.values())
        return hung or self.interrupted_by is not None

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
        started = time.monotonic()
        outcome = self._run_step(step)
        elapsed_ms = round((time.monotonic() - started) * 1000, 2)
        return StepOutcome(
            step,
            outcome.status,
            outcome.detail,
            elapsed_ms,
            outcome.driver_after,
            outcome.command_after,
        )

    def _run_step(self, step: Step) -> StepOutcome:
        if not step.action.mutates:
            return StepOutcome(step, Status.HELD, step.reason)
        if self.options.dry_run:
            return StepOutcome(
                step,
                Status.WOULD,
                f"would {step.action.value} ({step.reason})",
                driver_after=self.kernel.driver(step.bdf),
                command_after=self.kernel.read_command(step.bdf),
            )
        if step.action is Action.CLEAR_BUS_MASTER:
            return self._clear_bus_master(step)
        return self._wait(self._begin(step))

    # -- unbind ------------------------------------------------------------------------------

    def _wait(self, started: StepOutcome | _Pending) -> StepOutcome:
        """One step's child, waited for alone (the one-at-a-time path)."""
        if isinstance(started, StepOutcome):
            return started
        return started.finish(wait_first([started.child])[1])

    def _begin_unbind(self, step: Step) -> StepOutcome | _Pending:
        bdf, kernel, began = step.bdf, self.kernel, time.monotonic()
        driver = kernel.driver(bdf)
        if not kernel.exists(bdf):
            return StepOutcome(step, Status.GONE, "function is gone")
        if driver is None:
            return self._then_bus_master(step, "driver already gone")
        original_override = kernel.driver_override(bdf)
        try:
            # Keep udev, module loads and drivers_autoprobe from binding anything again.
            kernel.set_driver_override(bdf, "none")
        except KernelWriteFailed as error:
            return StepOutcome(
                step, Status.FAILED, f"driver_override: {error}", driver_after=driver
            )
        child = kernel.start_unbind(bdf, driver, self.options.unbind_timeout_s)
        return _Pending(
            step,
            child,
            began,
            functools.partial(self._unbind_outcome, step, driver, original_override),
        )

    def _unbind_outcome(
        self, step: Step, driver: str, original_override: str | None, result: ChildResult
    ) -> StepOutcome:
        bdf, kernel = step.bdf, self.kernel
        if not result.finished:
            return StepOutcome(
                step,
                Status.HUNG,
                f"{driver} remove() did not return within "
                f"{self.options.unbind_timeout_s:g} s (child {result.pid} abandoned; "
                f"{step.reason})",
                driver_after=kernel.driver(bdf),
            )
        if not kernel.exists(bdf):
            self._record_rebind(bdf, driver, original_override)
            return StepOutcome(step, Status.DONE, f"unbound from {driver}; function removed")
        driver_after = kernel.driver(bdf)
        if driver_after is not None:
            self._restore_override(bdf, original_override)
            why = (
                errno.errorcode.get(result.errno, str(result.errno))
                if result.errno
                else "write succeeded"
            )
            return StepOutcome(
                step,
                Status.FAILED,
                f"still bound to {driver_after} after unbind ({why})",
                driver_after=driver_after,
            )
        self._record_rebind(bdf, driver, original_override)
        return self._then_bus_master(step, f"unbound from {driver}")

    def _record_rebind(self, bdf: Bdf, driver: str, original_override: str | None) -> None:
        self.journal.record(
            Undo(UndoKind.REBIND, bdf, driver=driver, driver_override=original_override)
        )

    def _restore_override(self, bdf: Bdf, original_override: str | None) -> None:
        # A failure here is reported through the step's own failure; nothing more to do.
        with contextlib.suppress(KernelWriteFailed):
            self.kernel.set_driver_override(bdf, original_override)

    def _then_bus_master(self, step: Step, done: str) -> StepOutcome:
        # pci_device_remove() never clears bus master, and after an unbind the kernel's own
        # kexec-time pci_clear_master() skips the device (current_state is PCI_UNKNOWN).
        outcome = self._clear_bus_master(step)
        if outcome.status is Status.ALREADY:
            return StepOutcome(
                step, Status.DONE, f"{done}; bus master off", command_after=outcome.command_after
            )
        if outcome.status is Status.DONE:
            return StepOutcome(
                step,
                Status.DONE,
                f"{done}; driver left bus master on: {outcome.detail}",
                command_after=outcome.command_after,
            )
        return StepOutcome(
            step, outcome.status, f"{done}; {outcome.detail}", command_after=outcome.command_after
        )

    # -- bus master --------------------------------------------------------------------------

    def _clear_bus_master(self, step: Step) -> StepOutcome:
        bdf, kernel = step.bdf, self.kernel
        command = kernel.read_command(bdf)
        if command is None:
            if not kernel.exists(bdf):
                return StepOutcome(step, Status.GONE, "function is gone")
            return StepOutcome(step, Status.FAILED, "config space unreadable")
        if command == CONFIG_GONE:
            return StepOutcome(
                step,
                Status.GONE,
                "config reads 0xffff (gone, link down or frozen)",
                command_after=command,
            )
        if not command & PCI_COMMAND_MASTER:
            return StepOutcome(
                step, Status.ALREADY, "bus master already off", command_after=command
            )
        try:
            kernel.write_command(bdf, command & ~PCI_COMMAND_MASTER)
        except KernelWriteFailed as error:
            if error.errno == errno.EPERM:
                return self._clear_bus_master_through_enable(step, command)
            return StepOutcome(
                step, Status.FAILED, f"config write refused: {error}", command_after=command
            )
        self.journal.record(Undo(UndoKind.RESTORE_COMMAND, bdf, command=command))
        return self._read_back(step, "bus master cleared")

    def _clear_bus_master_through_enable(self, step: Step, command: int) -> StepOutcome:
        """Under integrity lockdown config writes fail with EPERM; `enable` is still allowed.

        enable_store() ← 0 calls pci_disable_device(), which clears bus master once the enable
        count reaches 0; it answers EBUSY while a driver is bound and EIO if not enabled.
        """
        bdf, kernel = step.bdf, self.kernel
        driver = kernel.driver(bdf)
        if driver is not None:
            return StepOutcome(
                step,
                Status.FAILED,
                f"config writes blocked (EPERM, lockdown?) "
                f"and {driver} is bound: bus master left on",
                command_after=command,
            )
        was_enabled = kernel.read_attribute(bdf, "enable") == "1"
        try:
            if not was_enabled:
                kernel.write_enable(bdf, True)  # so that disabling runs do_pci_disable_device()
            for _ in range(16):  # each write drops the enable count by one
                kernel.write_enable(bdf, False)
                if kernel.read_attribute(bdf, "enable") != "1":
                    break
        except KernelWriteFailed as error:
            return StepOutcome(
                step,
                Status.FAILED,
                f"config writes blocked and enable failed: {error}",
                command_after=kernel.read_command(bdf),
            )
        if was_enabled:
            self.journal.record(Undo(UndoKind.REENABLE, bdf))
        return self._read_back(
            step, "bus master cleared through enable (config writes blocked: EPERM)"
        )

    def _read_back(self, step: Step, done: str) -> StepOutcome:
        # Platform accessors swallow write errors (pci_write_config() returns the count):
        # only a read-back tells what happened.
        after = self.kernel.read_command(step.bdf)
        if after is None or after == CONFIG_GONE:
            return StepOutcome(
                step,
                Status.GONE,
                f"{done}, but the read-back failed (gone, link down or frozen)",
                command_after=after,
            )
        if after & PCI_COMMAND_MASTER:
            return StepOutcome(
                step,
                Status.FAILED,
                f"bus master still on after write (COMMAND {after:#06x})",
                command_after=after,
            )
        return StepOutcome(step, Status.DONE, done, command_after=after)

    # -- secondary bus reset -----------------------------------------------------------------

    def _begin_reset(self, step: Step) -> StepOutcome | _Pending:
        """The kernel's own secondary bus reset, which saves and restores the config of
        everything below (bus master included, as we left it: off)."""
        bridge, kernel, began = step.bdf, self.kernel, time.monotonic()
        if kernel.has_attribute(bridge, "reset_subordinate"):
            # ENOTTY: a device below is quirked NO_BUS_RESET, or the link did not come back
            # within the kernel's wait; EAGAIN: it could not lock every device below.
            how = "reset_subordinate"
            child = kernel.start_reset_subordinate(bridge, RESET_TIMEOUT_S)
            return _Pending(step, child, began, functools.partial(self._reset_outcome, step, how))
        children = [bdf for bdf in self.topology.children(bridge) if kernel.exists(bdf)]
        methods = kernel.read_attribute(children[0], "reset_method") if len(children) == 1 else None
        if methods is not None and "bus" in methods.split():
            how = f"bus reset through {children[0]} (reset_method bus)"
            child = kernel.start_function_bus_reset(children[0], RESET_TIMEOUT_S)
            return _Pending(step, child, began, functools.partial(self._reset_outcome, step, how))
        why = (
            f"{len(children)} functions on the bus"
            if len(children) != 1
            else f"{children[0]} has no 'bus' reset method"
        )
        if not self.options.raw_sbr:
            return StepOutcome(
                step,
                Status.FAILED,
                f"no kernel-mediated reset (no "
                f"reset_subordinate; {why}); --raw-sbr allows a raw one",
            )
        if kernel.is_powernv():
            # A raw SBR bypasses OPAL (pnv_pci_reset_secondary_bus) and freezes the EEH PE.
            return StepOutcome(step, Status.FAILED, "raw SBR refused on PowerNV (bypasses OPAL)")
        return self._raw_secondary_bus_reset(step)

    def _reset_outcome(self, step: Step, how: str, result: ChildResult) -> StepOutcome:
        if not result.finished:
            return StepOutcome(
                step,
                Status.FAILED,
                f"{how}: no answer within {RESET_TIMEOUT_S:g} s (child {result.pid} abandoned)",
            )
        if result.errno:
            name = errno.errorcode.get(result.errno, str(result.errno))
            outcome = self._after_reset(step, f"{how} refused: {name}")
            return dataclasses.replace(outcome, status=Status.FAILED)
        return self._after_reset(step, how)

    def _raw_secondary_bus_reset(self, step: Step) -> StepOutcome:
        bridge, kernel = step.bdf, self.kernel
        control = kernel.read_bridge_control(bridge)
        if control is None or control == CONFIG_GONE:
            return StepOutcome(step, Status.GONE, "bridge control unreadable")
        try:
            kernel.write_bridge_control(bridge, control | PCI_BRIDGE_CTL_BUS_RESET)
            kernel.sleep(SBR_ASSERT_S)
            kernel.write_bridge_control(bridge, control & ~PCI_BRIDGE_CTL_BUS_RESET)
        except KernelWriteFailed as error:
            return StepOutcome(step, Status.FAILED, f"raw SBR: {error}")
        kernel.sleep(SBR_SETTLE_S)
        return self._after_reset(step, "raw secondary bus reset")

    def _after_reset(self, step: Step, how: str) -> StepOutcome:
        """Wait until everything below answers config reads again, then check bus master."""
        below = [
            bdf for bdf in self.topology.descendants(step.bdf) if not self.topology[bdf].is_virtfn
        ]  # VFs read 0xffff IDs by design
        waited = 0.0
        silent = self._silent(below)
        while silent and waited < SBR_ANSWER_DEADLINE_S:
            self.kernel.sleep(0.02)
            waited += 0.02
            silent = self._silent(below)
        if silent:
            return StepOutcome(
                step, Status.FAILED, f"{how}; no answer from " + ", ".join(map(str, silent))
            )
        masters = [
            bdf
            for bdf in below
            if (self.kernel.read_command(bdf) or 0) & PCI_COMMAND_MASTER
            and self.kernel.read_command(bdf) != CONFIG_GONE
        ]
        if masters:
            return StepOutcome(
                step, Status.FAILED, f"{how}; bus master on again: " + ", ".join(map(str, masters))
            )
        return StepOutcome(step, Status.DONE, f"{how}; {len(below)} functions answered")

    def _silent(self, functions: list[Bdf]) -> list[Bdf]:
        return [
            bdf
            for bdf in functions
            if self.kernel.exists(bdf) and self.kernel.read_config16(bdf, 0) == CONFIG_GONE
        ]
