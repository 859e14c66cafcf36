"""The plan's invariants, checked on generated topologies, policies and facts."""

from __future__ import annotations

from collections.abc import Iterable
from random import Random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petitkexec.bdf import Bdf
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


def decision_waves(plan: Plan) -> dict[Bdf, int]:
    """The wave of each function's one decision."""
    return {step.bdf: step.wave for step in plan.steps if step.action is not Action.RESET_BUS}


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


@PROPERTY_SETTINGS
@given(scenarios())
def test_waves_never_go_back_along_the_plan(scenario: Scenario) -> None:
    waves = [step.wave for step in plan_of(scenario).steps]
    assert waves == sorted(waves)


@PROPERTY_SETTINGS
@given(scenarios())
def test_a_bridge_runs_in_a_later_wave_than_every_function_below_it(scenario: Scenario) -> None:
    # Steps of one wave may run side by side, so order within the list is not enough.
    topology = scenario.topology
    wave = decision_waves(plan_of(scenario))
    for function in topology:
        for below in topology.descendants(function.bdf):
            assert wave[function.bdf] > wave[below], (function.bdf, below)


@PROPERTY_SETTINGS
@given(scenarios())
def test_a_pf_runs_in_a_later_wave_than_its_vfs(scenario: Scenario) -> None:
    wave = decision_waves(plan_of(scenario))
    for pf, vfs in scenario.topology.vfs_of.items():
        assert all(wave[pf] > wave[vf] for vf in vfs), pf


@PROPERTY_SETTINGS
@given(scenarios(hot_reset=True))
def test_resets_run_in_a_wave_of_their_own_after_every_decision(scenario: Scenario) -> None:
    plan = plan_of(scenario)
    resets = plan.with_action(Action.RESET_BUS)
    decisions = [step for step in plan.steps if step.action is not Action.RESET_BUS]
    if resets and decisions:
        assert min(step.wave for step in resets) > max(step.wave for step in decisions)


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
