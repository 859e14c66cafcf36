"""The last look before the handoff: did anything a teardown quieted come back?

driver_override "none" on every torn-down function keeps later probes away
(pci_match_device()), but not a probe already under way when it was written, and not a write
to COMMAND by someone else. So each function the teardown left unbound or with bus mastering
off is read again (driver, COMMAND) right before the handoff, and what came back is a failed
step, said so in the report:
- bound again: at kexec, device_shutdown() runs pci_device_shutdown() for it, its driver's
  shutdown() and then pci_clear_master(), as probe made it D0 again: the quiesce a kexec
  without petitkexec gets. A failed step like any other (--strict withholds the handoff).
- unbound with bus mastering on: pci_device_remove() left it PCI_UNKNOWN, which
  pci_device_shutdown() skips, so nothing would stop its DMA. It is cleared again
  (journalled); one that cannot be cleared stops the run, and the handoff does not happen.
"""

from __future__ import annotations

from dataclasses import dataclass

from petitkexec.busmaster import BusMasterClearer
from petitkexec.kernel import Kernel
from petitkexec.model import Topology, bus_master_of
from petitkexec.outcome import Status, StepOutcome
from petitkexec.plan import Action


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class ReadBack:
    """The outcomes with what came back marked failed, and why the run must stop, if it must."""

    outcomes: tuple[StepOutcome, ...]
    came_back: int = 0
    stop_because: str | None = None


def read_back(
    kernel: Kernel,
    topology: Topology,
    bus_master: BusMasterClearer,
    outcomes: tuple[StepOutcome, ...],
) -> ReadBack:
    checked: list[StepOutcome] = []
    came_back, dma_left_on = 0, []
    for outcome in outcomes:
        back = _came_back(kernel, topology, outcome)
        if back is None:
            checked.append(outcome)
            continue
        came_back += 1
        driver, command = back
        if driver is not None:
            checked.append(
                _failed(outcome, f"bound to {driver} again before the handoff", command, driver)
            )
            continue
        cleared = bus_master.clear(outcome.step)
        if cleared.status is Status.DONE:
            checked.append(
                _failed(outcome, "bus master on again before the handoff; cleared again", command)
            )
        else:
            dma_left_on.append(str(outcome.step.bdf))
            checked.append(
                _failed(
                    outcome, f"bus master on again before the handoff: {cleared.detail}", command
                )
            )
    stop_because = None
    if dma_left_on:
        stop_because = (
            "bus master on again and not clearable (nothing would stop its DMA at kexec): "
            + ", ".join(dma_left_on)
        )
    return ReadBack(tuple(checked), came_back, stop_because)


def _came_back(
    kernel: Kernel, topology: Topology, outcome: StepOutcome
) -> tuple[str | None, int | None] | None:
    """(driver, COMMAND) now, if the function is no longer as the step left it."""
    step = outcome.step
    if outcome.status not in (Status.DONE, Status.ALREADY):
        return None
    if step.action not in (Action.UNBIND, Action.CLEAR_BUS_MASTER) or not kernel.exists(step.bdf):
        return None
    was_bound = (
        step.action is Action.CLEAR_BUS_MASTER
        and step.bdf in topology.functions
        and (topology[step.bdf].driver is not None)
    )
    driver, command = kernel.driver(step.bdf), kernel.read_command(step.bdf)
    rebound = driver is not None and not was_bound
    master_back = (
        bus_master_of(command) is True
        and bus_master_of(outcome.command_after) is False
        and not step.keep_bus_master
    )
    return (driver if rebound else None, command) if rebound or master_back else None


def _failed(
    outcome: StepOutcome, why: str, command: int | None, rebound_to: str | None = None
) -> StepOutcome:
    return StepOutcome(
        outcome.step,
        Status.FAILED,
        f"{outcome.detail}; came back: {why}",
        outcome.elapsed_ms,
        driver_after=rebound_to or outcome.driver_after,
        command_after=command,
        cleared_bus_master=outcome.cleared_bus_master,
    )
