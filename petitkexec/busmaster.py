"""Turning bus mastering off: a config-space write, or `enable` where lockdown blocks config.

pci_device_remove() never clears bus master, and after an unbind the kernel's own kexec-time
pci_clear_master() (pci_device_shutdown()) skips the device, so this is ours to do for every
function a teardown touches, and to read back: platform accessors swallow write errors
(pci_write_config() returns the byte count regardless).
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass

from petitkexec.errors import KernelWriteFailed
from petitkexec.journal import Journal, Undo, UndoKind
from petitkexec.kernel import Kernel
from petitkexec.model import CONFIG_GONE, PCI_COMMAND_MASTER
from petitkexec.outcome import Status, StepOutcome
from petitkexec.plan import Step


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class BusMasterClearer:
    """Clears bus master in PCI_COMMAND, journaling how to restore it."""

    kernel: Kernel
    journal: Journal

    def hold_off_probes(self, outcome: StepOutcome) -> StepOutcome:
        """driver_override "none" on a function this step left quiet without a driver
        (journalled): else udev's modprobe or a deferred probe may bind it before the kexec,
        and probe turns bus mastering back on (pci_set_master())."""
        bdf, kernel = outcome.step.bdf, self.kernel
        if outcome.status not in (Status.DONE, Status.ALREADY) or kernel.driver(bdf) is not None:
            return outcome
        original = kernel.driver_override(bdf)
        if original == "none":
            return outcome
        try:
            kernel.set_driver_override(bdf, "none")
        except KernelWriteFailed as error:
            # Not a failure of the step: the read-back before the handoff still looks.
            return dataclasses.replace(
                outcome, detail=f"{outcome.detail}; driver_override not set: {error}"
            )
        self.journal.record(Undo(UndoKind.RESTORE_OVERRIDE, bdf, driver_override=original))
        return outcome

    def clear(self, step: Step) -> StepOutcome:
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
                return self._clear_through_enable(step, command)
            return StepOutcome(
                step, Status.FAILED, f"config write refused: {error}", command_after=command
            )
        self.journal.record(Undo(UndoKind.RESTORE_COMMAND, bdf, command=command))
        return self._read_back(step, "bus master cleared")

    def after_unbind(self, step: Step, done: str) -> StepOutcome:
        """The read-back (and clear) every unbind needs: drivers without managed enable
        (pcim_enable_device) leave bus master on, and pcieport's enable count may stay above
        0 (seen on q35 root ports)."""
        outcome = self.clear(step)
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

    def _clear_through_enable(self, step: Step, command: int) -> StepOutcome:
        """Under integrity lockdown config writes fail with EPERM; `enable` is still allowed.

        `enable` shows the enable count (enable_show: atomic_read(&enable_cnt)); each `0`
        written calls pci_disable_device() once, which clears bus master when the count
        reaches 0. It answers EBUSY while a driver is bound and EIO when the count is 0.
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
        original_count = kernel.read_enable_count(bdf)
        try:
            if original_count is None:
                raise KernelWriteFailed(str(kernel.device_dir(bdf) / "enable"), errno.EIO)
            if original_count == 0:
                # Bus master on with a count of 0 (firmware left it): enabling first makes
                # the next `0` run do_pci_disable_device(), which clears it.
                kernel.write_enable(bdf, True)
            for _ in range(max(original_count, 1)):
                kernel.write_enable(bdf, False)
        except KernelWriteFailed as error:
            return StepOutcome(
                step,
                Status.FAILED,
                f"config writes blocked and enable failed: {error}",
                command_after=kernel.read_command(bdf),
            )
        if original_count:
            self.journal.record(Undo(UndoKind.REENABLE, bdf, enable_count=original_count))
        remaining = kernel.read_enable_count(bdf)
        if remaining:
            return StepOutcome(
                step,
                Status.FAILED,
                f"config writes blocked; enable count still {remaining} after "
                f"{original_count} disables",
                command_after=kernel.read_command(bdf),
            )
        return self._read_back(
            step,
            f"bus master cleared through enable (config writes blocked: EPERM; "
            f"count {original_count} → 0)",
        )

    def _read_back(self, step: Step, done: str) -> StepOutcome:
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
