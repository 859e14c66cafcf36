"""The plan's invariants, checked on generated topologies, policies and facts."""

from __future__ import annotations

from collections.abc import Iterable
from random import Random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petitkexec.bdf import Bdf
from petitkexec.execute import dependencies
from petitkexec.model import Topology
from petitkexec.plan import Action, Plan, build_plan
from tests.strategies import Scenario, scenarios, topologies

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def plan_of(scenario: Scenario) -> Plan:
    return build_plan(scenario.topology, scenario.policy, scenario.facts)


def positions(plan: Plan) -> dict[Bdf, int]:
    """Where each function's one decision (not its reset, which comes last) is in the plan."""
    return {
        step.bdf: index
        for index, step in enumerate(plan.steps)
        if step.action is not Action.RESET_BUS
    }


def with_dependencies(topology: Topology, origins: Iterable[Bdf]) -> set[Bdf]:
    """The origins, every bridge above them, and the PF of any VF among them, transitively."""
    closure: set[Bdf] = set()
    pending = [bdf for bdf in origins if bdf in topology.functions]
    while pending:
        bdf = pending.pop()
        if bdf in closure:
            continue
        closure.add(bdf)
        function = topology[bdf]
        for dependency in (function.parent, function.physfn):
            if dependency is not None and dependency in topology.functions:
                pending.append(dependency)
    return closure


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_function_appears_exactly_once_among_the_non_reset_steps(scenario: Scenario) -> None:
    plan = plan_of(scenario)
    decided = [step.bdf for step in plan.steps if step.action is not Action.RESET_BUS]
    assert sorted(decided) == sorted(scenario.topology.functions)


@PROPERTY_SETTINGS
@given(scenarios())
def test_no_bridge_is_decided_before_a_function_below_it(scenario: Scenario) -> None:
    topology, where = scenario.topology, positions(plan_of(scenario))
    for function in topology:
        below = list(topology.descendants(function.bdf))
        if not below:
            continue
        assert where[function.bdf] > max(where[bdf] for bdf in below), function.bdf


@PROPERTY_SETTINGS
@given(scenarios())
def test_no_pf_is_decided_before_one_of_its_vfs(scenario: Scenario) -> None:
    topology, where = scenario.topology, positions(plan_of(scenario))
    for pf, vfs in topology.vfs_of.items():
        assert where[pf] > max(where[vf] for vf in vfs), pf


def transitive(needs: dict[int, set[int]]) -> dict[int, set[int]]:
    """Everything a step waits for, directly or through the steps it waits for."""
    closure: dict[int, set[int]] = {}

    def visit(index: int, path: frozenset[int]) -> set[int]:
        assert index not in path, f"step {index} waits for itself"
        if index not in closure:
            found: set[int] = set()
            for need in needs[index]:
                found |= {need, *visit(need, path | {index})}
            closure[index] = found
        return closure[index]

    for index in needs:
        visit(index, frozenset())
    return closure


def below_of(topology: Topology, bdf: Bdf) -> set[Bdf]:
    """What must be torn down before `bdf`: every function below it and every VF of a PF among
    them or of itself, wherever the VF sits (another slot, another bus)."""
    found: set[Bdf] = set()
    pending = [*topology.children(bdf), *topology.vfs(bdf)]
    while pending:
        other = pending.pop()
        if other not in found:
            found.add(other)
            pending += [*topology.children(other), *topology.vfs(other)]
    return found


@PROPERTY_SETTINGS
@given(scenarios())
def test_no_step_starts_before_everything_below_it_has_finished(scenario: Scenario) -> None:
    # The executor runs a step as soon as execute.dependencies() says it may: not the waves.
    topology, steps = scenario.topology, plan_of(scenario).steps
    waits_for = transitive(dependencies(topology, steps))
    index_of = {step.bdf: i for i, step in enumerate(steps) if step.action is not Action.RESET_BUS}
    for index, step in enumerate(steps):
        if step.action is Action.RESET_BUS:
            continue
        first = {index_of[bdf] for bdf in below_of(topology, step.bdf)}
        assert first <= waits_for[index], step.bdf


@PROPERTY_SETTINGS
@given(scenarios())
def test_a_pf_waits_for_each_of_its_vfs(scenario: Scenario) -> None:
    topology, steps = scenario.topology, plan_of(scenario).steps
    needs = dependencies(topology, steps)
    index_of = {step.bdf: i for i, step in enumerate(steps) if step.action is not Action.RESET_BUS}
    for pf, vfs in topology.vfs_of.items():
        assert {index_of[vf] for vf in vfs} <= needs[index_of[pf]], pf
        assert any(vf.slot != pf.slot for vf in vfs)  # VFs in other slots are covered


@PROPERTY_SETTINGS
@given(scenarios(hot_reset=True))
def test_a_reset_waits_for_every_other_step_and_no_step_waits_for_a_reset(
    scenario: Scenario,
) -> None:
    steps = plan_of(scenario).steps
    needs = dependencies(scenario.topology, steps)
    resets = {i for i, step in enumerate(steps) if step.action is Action.RESET_BUS}
    for index in resets:
        assert needs[index] == set(range(len(steps))) - resets
    assert not any(needs[index] & resets for index in range(len(steps)))


@PROPERTY_SETTINGS
@given(scenarios())
def test_protected_functions_their_bridges_and_pfs_are_never_touched(scenario: Scenario) -> None:
    topology, policy = scenario.topology, scenario.policy
    protected = {bdf for bdf in scenario.facts.needed if not policy.unprotected(topology[bdf])}
    untouchable = with_dependencies(topology, protected)
    plan = plan_of(scenario)
    assert not {step.bdf for step in plan.mutating_steps} & untouchable
    for bdf in protected:
        assert plan.decision(bdf).action is Action.PROTECT


@PROPERTY_SETTINGS
@given(scenarios())
def test_kept_functions_their_bridges_and_pfs_are_never_touched(scenario: Scenario) -> None:
    topology, policy = scenario.topology, scenario.policy
    kept = {f.bdf for f in topology if policy.excluded_by(f) is not None}
    untouchable = with_dependencies(topology, kept)
    plan = plan_of(scenario)
    assert not {step.bdf for step in plan.mutating_steps} & untouchable
    for bdf in kept:
        assert plan.decision(bdf).action in (Action.KEEP, Action.PROTECT)


@PROPERTY_SETTINGS
@given(scenarios())
def test_reset_steps_come_last_and_only_on_bridges(scenario: Scenario) -> None:
    topology, plan = scenario.topology, plan_of(scenario)
    is_reset = [step.action is Action.RESET_BUS for step in plan.steps]
    assert is_reset == sorted(is_reset)  # no reset before any other step
    resets = plan.with_action(Action.RESET_BUS)
    if not scenario.policy.hot_reset:
        assert resets == ()
    for step in resets:
        assert topology[step.bdf].is_bridge
        assert topology.children(step.bdf)
        assert step.reason == "bridge, --hot-reset"


@PROPERTY_SETTINGS
@given(scenarios(hot_reset=True))
def test_resets_are_topmost_and_never_over_a_held_function(scenario: Scenario) -> None:
    topology, plan = scenario.topology, plan_of(scenario)
    reset = {step.bdf for step in plan.with_action(Action.RESET_BUS)}
    held = (Action.PROTECT, Action.KEEP)
    for bridge in reset:
        assert not reset & set(topology.ancestors(bridge)), bridge
        assert plan.decision(bridge).action not in held
        for below in topology.descendants(bridge):
            assert plan.decision(below).action not in held, (bridge, below)


@PROPERTY_SETTINGS
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_plan_is_deterministic(scenario: Scenario, random: Random) -> None:
    shuffled = list(scenario.topology)
    random.shuffle(shuffled)
    again = build_plan(Topology.from_functions(shuffled), scenario.policy, scenario.facts)
    assert plan_of(scenario) == plan_of(scenario) == again


@settings(max_examples=50, deadline=None)
@given(topologies())
def test_generated_topologies_are_consistent(topology: Topology) -> None:
    for function in topology:
        assert function.parent is None or topology[function.parent].is_bridge
        if function.physfn is not None:
            assert function.parent == topology[function.physfn].parent
            assert not topology[function.physfn].is_virtfn
    assert sum(len(topology.children(bdf)) for bdf in [None, *topology.functions]) == len(topology)
