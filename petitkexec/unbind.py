"""Unbinding a driver: remove() in a child with a deadline, then the bus-master read-back.

remove() is the well-tested path that leaves a device clean for the next driver. The write to
`unbind` runs it synchronously and can block forever (a held device_lock, a remove() waiting
for its users), so it runs in a child (petitkexec.deadline) that is abandoned at the deadline.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

from petitkexec.attributes import parse_count
from petitkexec.bdf import Bdf
from petitkexec.busmaster import BusMasterClearer
from petitkexec.deadline import Budget, ChildResult
from petitkexec.errors import KernelWriteFailed, errno_name
from petitkexec.journal import Journal, Undo, UndoKind
from petitkexec.kernel import Kernel
from petitkexec.outcome import Pending, Status, StepOutcome
from petitkexec.plan import Step

# NVMe: remove() shuts the controller down and waits for it (nvme_disable_ctrl() →
# nvme_wait_ready()) up to ctrl->shutdown_timeout, which nvme_init_identify() sets from the
# controller's RTD3E clamped to [nvme_core.shutdown_timeout, 60] s (the parameter alone when
# RTD3E is 0). RTD3E itself needs an Identify Controller admin command, which petitkexec does
# not send; the clamp bounds it. That wait checks fatal_signal_pending(): an unbind child
# SIGKILLed at a shorter deadline would cut a healthy drive's shutdown short.
NVME_DRIVER = "nvme"
NVME_SHUTDOWN_CEILING_S = 60  # the clamp's upper bound in nvme_init_identify()
NVME_DEFAULT_SHUTDOWN_TIMEOUT_S = 5  # nvme_core.shutdown_timeout's default
NVME_REMOVE_MARGIN_S = 2  # remove()'s own work around the shutdown wait


def unbind_deadline_s(kernel: Kernel, driver: str, configured_s: float) -> float:
    """The unbind deadline that fits the driver: --unbind-timeout, or longer for a driver
    whose remove() is known to wait longer for its device."""
    if driver != NVME_DRIVER:
        return configured_s
    parameter = parse_count(kernel.module_parameter("nvme_core", "shutdown_timeout"))
    floor_s = NVME_DEFAULT_SHUTDOWN_TIMEOUT_S if parameter is None else parameter
    shutdown_s = max(floor_s, NVME_SHUTDOWN_CEILING_S)
    return max(configured_s, shutdown_s + NVME_REMOVE_MARGIN_S)


@dataclass(frozen=True)
class Unbinder:
    kernel: Kernel
    journal: Journal
    bus_master: BusMasterClearer
    timeout_s: float
    budget: Budget = field(default_factory=Budget)

    def begin(self, step: Step) -> StepOutcome | Pending:
        bdf, kernel, began = step.bdf, self.kernel, time.monotonic()
        driver = kernel.driver(bdf)
        if not kernel.exists(bdf):
            return StepOutcome(step, Status.GONE, "function is gone")
        if driver is None:
            return self.bus_master.hold_off_probes(
                self.bus_master.after_unbind(step, "driver already gone")
            )
        original_override = kernel.driver_override(bdf)
        # pci_device_remove() disables SR-IOV and removes the VFs; rebinding the PF does not
        # bring them back, so the rollback needs the count.
        numvfs = kernel.read_sriov_numvfs(bdf)
        try:
            # Keep udev, module loads and drivers_autoprobe from binding anything again.
            kernel.set_driver_override(bdf, "none")
        except KernelWriteFailed as error:
            return StepOutcome(
                step, Status.FAILED, f"driver_override: {error}", driver_after=driver
            )
        own_deadline_s = unbind_deadline_s(kernel, driver, self.timeout_s)
        timeout_s = self.budget.clip(own_deadline_s)
        child = kernel.start_unbind(bdf, driver, timeout_s)
        finish = functools.partial(
            self._finish, step, driver, original_override, numvfs, timeout_s, own_deadline_s
        )
        return Pending(step, child, began, finish)

    def _finish(
        self,
        step: Step,
        driver: str,
        original_override: str | None,
        numvfs: int | None,
        timeout_s: float,
        own_deadline_s: float,
        result: ChildResult,
    ) -> StepOutcome:
        bdf, kernel = step.bdf, self.kernel
        if not result.finished:
            # The write to `unbind` has not returned, whatever brought its deadline (its own
            # or --time-limit's): remove() still holds device_lock, which device_shutdown()
            # takes at kexec, so the handoff would block on it. The write cannot be
            # interrupted (SIGKILL waits for it) and, when remove() does return, the device
            # is unbound with driver_override "none": journalled, so the rollback puts the
            # override back and binds the driver again.
            self._record_rebind(bdf, driver, original_override, numvfs, abandoned=result.pid)
            seconds = f"{round(timeout_s, 1):g} s"
            when = (
                f"still running when the time limit ran out (after {seconds}; "
                if timeout_s < own_deadline_s
                else f"did not return within {seconds} ("
            )
            return StepOutcome(
                step,
                Status.HUNG,
                f"{driver} remove() {when}child {result.pid} abandoned; {step.reason})",
                driver_after=kernel.driver(bdf),
            )
        if not kernel.exists(bdf):
            self._record_rebind(bdf, driver, original_override, numvfs)
            return StepOutcome(step, Status.DONE, f"unbound from {driver}; function removed")
        driver_after = kernel.driver(bdf)
        if driver_after is not None:
            # A failure here is reported through the step's own failure; nothing more to do.
            with contextlib.suppress(KernelWriteFailed):
                kernel.set_driver_override(bdf, original_override)
            why = errno_name(result.errno) if result.errno else "write succeeded"
            return StepOutcome(
                step,
                Status.FAILED,
                f"still bound to {driver_after} after unbind ({why})",
                driver_after=driver_after,
            )
        self._record_rebind(bdf, driver, original_override, numvfs)
        if step.keep_bus_master:
            return StepOutcome(step, Status.DONE, f"unbound from {driver}; bus master left (quirk)")
        return self.bus_master.after_unbind(step, f"unbound from {driver}")

    def _record_rebind(
        self,
        bdf: Bdf,
        driver: str,
        original_override: str | None,
        numvfs: int | None,
        abandoned: int = 0,
    ) -> None:
        # Undone last first: the PF is bound again, then its VFs are created, then the VFs'
        # own rebinds (journalled earlier, VFs go first) find them.
        if numvfs:
            self.journal.record(Undo(UndoKind.RESTORE_SRIOV, bdf, numvfs=numvfs))
        self.journal.record(
            Undo(
                UndoKind.REBIND,
                bdf,
                driver=driver,
                driver_override=original_override,
                abandoned_pid=abandoned,
            )
        )
