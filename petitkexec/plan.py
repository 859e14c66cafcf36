"""The plan: a pure function from (topology, policy, facts) to ordered, explained steps.

Order matters because of what the kernel does on unbind:
- unbinding a PF driver disables SR-IOV and removes its VFs, so VFs come first;
- unbinding `pcieport` calls pci_disable_device() on the port, clearing its bus master and so
  cutting DMA and MSI for everything below, so endpoints come before the bridges above them;
- a secondary-bus reset restores config as it was saved, so it comes after bus master is cleared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.policy import Policy
from petitkexec.quirks import Effect, Quirk, quirks_of


class Action(Enum):
    UNBIND = "unbind"
    CLEAR_BUS_MASTER = "clear-bus-master"
    RESET_BUS = "reset-bus"
    SKIP = "skip"
    PROTECT = "protect"
    KEEP = "keep"

    @property
    def mutates(self) -> bool:
        return self in (Action.UNBIND, Action.CLEAR_BUS_MASTER, Action.RESET_BUS)


@dataclass(frozen=True)
class Step:
    """One thing to do, or not do, to one PCI function, and why."""

    bdf: Bdf
    action: Action
    reason: str
    # The plan's order, for people and the JSON: VFs (0), endpoints (1), then bridges deepest
    # first. The executor does not run by waves: a step starts when the steps below it are
    # done (execute.dependencies).
    wave: int = field(default=0, compare=False)
    keep_bus_master: bool = False  # a quirk: never clear bus master on this function

    def __str__(self) -> str:
        return f"{self.action.value} ({self.reason})"

    def in_wave(self, wave: int) -> Step:
        # Not dataclasses.replace: it introspects the fields on every call, a third of
        # build_plan's time on a 10k-function machine.
        return Step(self.bdf, self.action, self.reason, wave, self.keep_bus_master)


@dataclass(frozen=True)
class Plan:
    """The ordered steps of a teardown, and the conflicts found while planning it."""

    steps: tuple[Step, ...]
    conflicts: tuple[str, ...] = ()

    def decision(self, bdf: Bdf) -> Step:
        """The one per-function step (unbind, clear-bus-master, skip, protect or keep)."""
        for step in self.steps:
            if step.bdf == bdf and step.action is not Action.RESET_BUS:
                return step
        raise KeyError(bdf)

    def with_action(self, action: Action) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.action is action)

    @property
    def mutating_steps(self) -> tuple[Step, ...]:
        return tuple(step for step in self.steps if step.action.mutates)


def build_plan(topology: Topology, policy: Policy, facts: SystemFacts) -> Plan:
    held = _held_functions(topology, policy, facts)
    decisions = {
        function.bdf: held.get(function.bdf)
        or _with_quirks(
            _decide(function, facts.needed.get(function.bdf)),
            quirks_of(function, facts.powernv, policy.ignore_quirks),
        )
        for function in topology
    }
    steps = [decisions[bdf].in_wave(wave) for bdf, wave in _teardown_order(topology)]
    if policy.hot_reset:
        last_wave = steps[-1].wave + 1 if steps else 0
        steps.extend(step.in_wave(last_wave) for step in _reset_steps(topology, decisions))
    return Plan(steps=tuple(steps), conflicts=_conflicts(topology, policy, held))


def _held_functions(topology: Topology, policy: Policy, facts: SystemFacts) -> dict[Bdf, Step]:
    """Protect what the system needs and keep what policy excludes, with what they depend on.

    A bridge above a held function stays as it is (unbinding its pcieport would cut the held
    function's DMA), and so does the PF of a held VF (unbinding the PF removes its VFs).
    Protection outranks keeping.
    """
    held: dict[Bdf, Step] = {}
    for function in topology:
        if function.bdf in facts.needed and not policy.unprotected(function):
            held[function.bdf] = Step(function.bdf, Action.PROTECT, facts.needed[function.bdf])
    for function in topology:
        if function.bdf not in held and (reason := policy.excluded_by(function)):
            held[function.bdf] = Step(function.bdf, Action.KEEP, reason)
    for action, word in ((Action.PROTECT, "protected"), (Action.KEEP, "kept")):
        pending = [step.bdf for step in held.values() if step.action is action]
        while pending:
            origin = pending.pop()
            for dependency, relation in _depended_on(topology, origin):
                if dependency not in held:
                    held[dependency] = Step(dependency, action, f"{relation} {word} {origin}")
                    pending.append(dependency)
    return held


def _depended_on(topology: Topology, bdf: Bdf) -> Iterator[tuple[Bdf, str]]:
    function = topology[bdf]
    if function.parent is not None and function.parent in topology.functions:
        yield function.parent, "above"
    if function.physfn is not None and function.physfn in topology.functions:
        yield function.physfn, "PF of"


def _decide(function: PciFunction, needed_for: str | None) -> Step:
    """The step for a function nothing holds; `needed_for` is set when --unprotect lifted
    a protection, so the report can say what the teardown is taking away."""
    step = _decide_unheld(function)
    if needed_for is None:
        return step
    return Step(step.bdf, step.action, f"{step.reason}; unprotected: {needed_for}")


def _with_quirks(step: Step, quirks: tuple[Quirk, ...]) -> Step:
    quirks = tuple(quirk for quirk in quirks if step.action.value in quirk.when)
    if not quirks:
        return step
    reason = "; ".join([step.reason, *(quirk.reason() for quirk in quirks)])
    keep = any(quirk.effect is Effect.KEEP_BUS_MASTER for quirk in quirks)
    if keep and step.action is Action.CLEAR_BUS_MASTER:
        return Step(step.bdf, Action.SKIP, reason, keep_bus_master=True)
    return Step(step.bdf, step.action, reason, keep_bus_master=keep)


def _decide_unheld(function: PciFunction) -> Step:
    bdf, driver, bus_master = function.bdf, function.driver, function.bus_master_on
    if driver is not None and function.driver_can_unbind:
        # remove() is the path that leaves a device clean for the next driver.
        return Step(bdf, Action.UNBIND, f"{driver}, has unbind")
    who = "no driver" if driver is None else f"{driver} cannot be unbound"
    if bus_master is None:
        return Step(bdf, Action.SKIP, f"{who}, config space unreadable")
    if bus_master:
        return Step(bdf, Action.CLEAR_BUS_MASTER, f"{who}, BME on")
    return Step(
        bdf,
        Action.SKIP,
        "bus master already off" if driver is None else f"{who}, bus master already off",
    )


def _teardown_order(topology: Topology) -> list[tuple[Bdf, int]]:
    """VFs (wave 0), then the other endpoints (wave 1), then bridges deepest first, one wave
    per depth."""
    functions = list(topology)
    order = [(f.bdf, 0) for f in functions if f.is_virtfn]
    order += [(f.bdf, 1) for f in functions if not f.is_virtfn and not f.is_bridge]
    bridge_depths = {
        f.bdf: topology.depth(f.bdf) for f in functions if f.is_bridge and not f.is_virtfn
    }
    deepest = max(bridge_depths.values(), default=0)
    order += [
        (bdf, 2 + deepest - depth)
        for bdf, depth in sorted(bridge_depths.items(), key=lambda item: (-item[1], item[0]))
    ]
    return order


def _reset_steps(topology: Topology, decisions: dict[Bdf, Step]) -> list[Step]:
    """One secondary-bus reset per topmost bridge whose whole subtree is torn down.

    A reset below a bridge also resets every bus further down, so nested bridges add nothing;
    a subtree holding a protected, kept or still-bound function is not reset at all.
    """
    resettable = {
        bdf: _subtree_resettable(topology, decisions, bdf)
        for bdf, function in topology.functions.items()
        if function.is_bridge and topology.children(bdf)
    }
    steps = []
    for bdf in sorted(resettable, key=lambda b: (topology.depth(b), b)):
        if resettable[bdf] and not any(resettable.get(up) for up in topology.ancestors(bdf)):
            steps.append(Step(bdf, Action.RESET_BUS, "bridge, --hot-reset"))
    return steps


def _subtree_resettable(topology: Topology, decisions: dict[Bdf, Step], bridge: Bdf) -> bool:
    if decisions[bridge].action in (Action.PROTECT, Action.KEEP):
        return False
    for below in topology.descendants(bridge):
        step = decisions[below]
        if step.action in (Action.PROTECT, Action.KEEP):
            return False
        if step.action is not Action.UNBIND and topology[below].driver is not None:
            return False  # a driver we could not unbind is still driving it
    return True


def _conflicts(topology: Topology, policy: Policy, held: dict[Bdf, Step]) -> tuple[str, ...]:
    """Requests the plan cannot honour: --only naming something the system needs, or nothing."""
    conflicts = []
    for bdf, step in held.items():
        if (
            step.action is Action.PROTECT
            and policy.only
            and any(spec.matches(topology[bdf]) for spec in policy.only)
        ):
            conflicts.append(
                f"--only selects {bdf} but it is protected ({step.reason}); "
                f"add --unprotect {bdf} to tear it down anyway"
            )
    for spec in policy.only:
        if not any(spec.matches(function) for function in topology):
            hint = (
                f" (read as vendor:device; for PCI domain {spec.text.split(':')[0]} write "
                f"{spec.text.split(':')[0]}:*:*.*)"
                if spec.kind == "id"
                else ""
            )
            conflicts.append(f"--only {spec.text} matches no PCI function{hint}")
    return tuple(conflicts)
