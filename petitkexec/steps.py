"""How each mutating step is carried out against the kernel, recording how to undo it.

Unbinds and resets block in the kernel, so they are started in a child (see
petitkexec.deadline) and finished when it answers; bus-master clears are quick and run inline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from petitkexec.bdf import Bdf
from petitkexec.deadline import Child, ChildResult
from petitkexec.errors import KernelWriteFailed
from petitkexec.journal import Journal, Undo, UndoKind
from petitkexec.kernel import Kernel
from petitkexec.model import (
    CONFIG_GONE,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_COMMAND_MASTER,
    Topology,
    bus_master_of,
)
from petitkexec.outcome import Status, StepOutcome
from petitkexec.plan import Step

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


@dataclass(frozen=True)
class ExecutionOptions:
    unbind_timeout_s: float = DEFAULT_UNBIND_TIMEOUT_S
    # Independent devices' remove() calls run side by side (at most this many at once): a
    # remove() that waits for hardware (NVMe, NICs) costs its own time, not everyone's.
    jobs: int = DEFAULT_JOBS
    raw_sbr: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Pending:
    """A step whose blocking kernel call runs in `child`; `finish` reads its result."""

    step: Step
    child: Child
    began: float
    finish: Callable[[ChildResult], StepOutcome]


@dataclass
class StepActions:
    kernel: Kernel
    topology: Topology
    journal: Journal
    options: ExecutionOptions

    def begin_unbind(self, step: Step) -> StepOutcome | Pending:
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
        return Pending(
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
        outcome = self.clear_bus_master(step)
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
                cleared_bus_master=True,
            )
        return StepOutcome(
            step, outcome.status, f"{done}; {outcome.detail}", command_after=outcome.command_after
        )

    # -- bus master --------------------------------------------------------------------------

    def clear_bus_master(self, step: Step) -> StepOutcome:
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
        return StepOutcome(step, Status.DONE, done, command_after=after, cleared_bus_master=True)

    # -- secondary bus reset -----------------------------------------------------------------

    def begin_reset(self, step: Step) -> StepOutcome | Pending:
        """The kernel's own secondary bus reset, which saves and restores the config of
        everything below (bus master included, as we left it: off)."""
        bridge, kernel, began = step.bdf, self.kernel, time.monotonic()
        if kernel.has_attribute(bridge, "reset_subordinate"):
            # ENOTTY: a device below is quirked NO_BUS_RESET, or the link did not come back
            # within the kernel's wait; EAGAIN: it could not lock every device below.
            how = "reset_subordinate"
            child = kernel.start_reset_subordinate(bridge, RESET_TIMEOUT_S)
            return Pending(step, child, began, functools.partial(self._reset_outcome, step, how))
        children = [bdf for bdf in self.topology.children(bridge) if kernel.exists(bdf)]
        methods = kernel.read_attribute(children[0], "reset_method") if len(children) == 1 else None
        if methods is not None and "bus" in methods.split():
            how = f"bus reset through {children[0]} (reset_method bus)"
            child = kernel.start_function_bus_reset(children[0], RESET_TIMEOUT_S)
            return Pending(step, child, began, functools.partial(self._reset_outcome, step, how))
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
        masters = [bdf for bdf in below if bus_master_of(self.kernel.read_command(bdf))]
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
