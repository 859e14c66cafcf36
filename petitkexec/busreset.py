"""Secondary bus resets: the kernel's own where it offers one, a raw SBR only when asked.

The kernel's resets (reset_subordinate, or `reset` with reset_method `bus`) save and restore the
config of everything below, bus master included as we left it: off. They block for link
training and run in a child with a deadline, like unbinds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field

from petitkexec.bdf import Bdf
from petitkexec.deadline import Budget, ChildResult
from petitkexec.errors import KernelWriteFailed, errno_name
from petitkexec.kernel import Kernel
from petitkexec.model import CONFIG_GONE, PCI_BRIDGE_CTL_BUS_RESET, Topology, bus_master_of
from petitkexec.outcome import Pending, Status, StepOutcome
from petitkexec.plan import Step

# Secondary bus reset timing as the kernel does it (pci_reset_secondary_bus(),
# pci_bridge_wait_for_secondary_bus()): hold reset ≥ 1 ms (spec Trst), then ≥ 100 ms before
# the first config access, then devices get up to 1 s to answer.
SBR_ASSERT_S = 0.002
SBR_SETTLE_S = 0.1
SBR_ANSWER_DEADLINE_S = 1.0
# How often a function that does not answer yet (0xffff) is asked again within that second.
SBR_ANSWER_POLL_S = 0.02


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class BusResetter:
    """Resets the bus below a bridge: the kernel's reset, in a child with a deadline, or raw SBR."""

    kernel: Kernel
    topology: Topology
    timeout_s: float
    raw_sbr_allowed: bool
    budget: Budget = field(default_factory=Budget)

    def begin(self, step: Step) -> StepOutcome | Pending:
        bridge, kernel, began = step.bdf, self.kernel, time.monotonic()
        timeout_s = self.budget.clip(self.timeout_s)
        if kernel.has_attribute(bridge, "reset_subordinate"):
            # ENOTTY: a device below is quirked NO_BUS_RESET, or the link did not come back
            # within the kernel's wait; EAGAIN: it could not lock every device below.
            how = "reset_subordinate"
            child = kernel.start_reset_subordinate(bridge, timeout_s)
            return Pending(
                step, child, began, functools.partial(self._finish, step, how, timeout_s)
            )
        children = [bdf for bdf in self.topology.children(bridge) if kernel.exists(bdf)]
        methods = kernel.read_attribute(children[0], "reset_method") if len(children) == 1 else None
        if methods is not None and "bus" in methods.split():
            how = f"bus reset through {children[0]} (reset_method bus)"
            child = kernel.start_function_bus_reset(children[0], timeout_s)
            return Pending(
                step, child, began, functools.partial(self._finish, step, how, timeout_s)
            )
        why = (
            f"{len(children)} functions on the bus"
            if len(children) != 1
            else f"{children[0]} has no 'bus' reset method"
        )
        if not self.raw_sbr_allowed:
            return StepOutcome(
                step,
                Status.FAILED,
                f"no kernel-mediated reset (no reset_subordinate; {why}); "
                "--raw-sbr allows a raw one",
            )
        if kernel.is_powernv():
            # A raw SBR bypasses OPAL (pnv_pci_reset_secondary_bus) and freezes the EEH PE.
            return StepOutcome(step, Status.FAILED, "raw SBR refused on PowerNV (bypasses OPAL)")
        return self._raw_secondary_bus_reset(step)

    def _finish(self, step: Step, how: str, timeout_s: float, result: ChildResult) -> StepOutcome:
        if not result.finished:
            # The reset still holds the device locks below the bridge (pci_bus_lock), which
            # the kernel's device_shutdown() at kexec takes too: as bad as a hung unbind,
            # whether its own deadline passed or --time-limit cut it short.
            why = "time limit ran out" if timeout_s < self.timeout_s else "no answer"
            return StepOutcome(
                step,
                Status.HUNG,
                f"{how}: {why} within {round(timeout_s, 1):g} s (child {result.pid} abandoned)",
            )
        if result.errno:
            outcome = self._after_reset(step, f"{how} refused: {errno_name(result.errno)}")
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
            self.kernel.sleep(SBR_ANSWER_POLL_S)
            waited += SBR_ANSWER_POLL_S
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
