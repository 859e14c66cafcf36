"""How a plan looks: a tree like `lspci -t` for people, JSON in execution order for programs."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.plan import Action, Plan, build_plan
from petitkexec.policy import Policy
from petitkexec.render import describe_function, plan_summary, plan_to_json, plan_tree
from tests.builders import policy_of
from tests.strategies import Scenario, scenarios

B = Bdf.parse
LINE = re.compile(r"^(?P<indent>[│ ]*)[├└]─ (?P<bdf>[0-9a-f]+:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) ")


def function(
    bdf: str,
    driver: str | None = None,
    *,
    parent: str | None = None,
    physfn: str | None = None,
    bridge: bool = False,
    command: int = 0x0406,
) -> PciFunction:
    return PciFunction(
        B(bdf),
        0x8086 if bridge else 0x15B3,
        0x9D10 if bridge else 0x1017,
        0x060400 if bridge else 0x020000,
        0x01 if bridge else 0x00,
        command,
        driver=driver,
        driver_can_unbind=driver is not None,
        parent=None if parent is None else B(parent),
        physfn=None if physfn is None else B(physfn),
    )


def machine() -> Topology:
    return Topology.from_functions(
        [
            function("0000:00:00.0", command=0),
            function("0000:00:1c.0", "pcieport", bridge=True),
            function("0000:01:00.0", "pcieport", parent="0000:00:1c.0", bridge=True),
            function("0000:02:00.0", "mlx5_core", parent="0000:01:00.0"),
            function("0000:02:00.1", "ixgbevf", parent="0000:01:00.0", physfn="0000:02:00.0"),
            function("0000:00:1f.2", "ahci"),
            function("0001:00:00.0", "nvme"),
        ]
    )


def tree_lines(topology: Topology, plan: Plan) -> list[tuple[int, str, str]]:
    """(depth, bdf, line) for every function line of the tree."""
    found = []
    for line in plan_tree(topology, plan).splitlines():
        match = LINE.match(line)
        if match:
            found.append((len(match["indent"]) // 3, match["bdf"], line))
    return found


def test_the_tree_shows_each_domain_with_its_functions_indented_under_their_bridges() -> None:
    topology = machine()
    plan = build_plan(topology, Policy(), SystemFacts())
    assert plan_tree(topology, plan) == "\n".join(
        [
            "PCI domain 0000",
            "├─ 0000:00:00.0 15b3:1017 class 020000 driver -  →  skip (bus master already off)",
            "├─ 0000:00:1c.0 8086:9d10 class 060400 driver pcieport [bridge]  →  "
            "unbind (pcieport, has unbind)",
            "│  └─ 0000:01:00.0 8086:9d10 class 060400 driver pcieport [bridge]  →  "
            "unbind (pcieport, has unbind)",
            "│     ├─ 0000:02:00.0 15b3:1017 class 020000 driver mlx5_core  →  "
            "unbind (mlx5_core, has unbind)",
            "│     └─ 0000:02:00.1 15b3:1017 class 020000 driver ixgbevf [VF of 0000:02:00.0]  →  "
            "unbind (ixgbevf, has unbind)",
            "└─ 0000:00:1f.2 15b3:1017 class 020000 driver ahci  →  unbind (ahci, has unbind)",
            "PCI domain 0001",
            "└─ 0001:00:00.0 15b3:1017 class 020000 driver nvme  →  unbind (nvme, has unbind)",
        ]
    )


def test_children_follow_their_bridge_one_level_deeper() -> None:
    topology = machine()
    lines = tree_lines(topology, build_plan(topology, Policy(), SystemFacts()))
    depth_of = {bdf: depth for depth, bdf, _ in lines}
    order = [bdf for _, bdf, _ in lines]
    for function in topology:
        if function.parent is not None:
            assert depth_of[str(function.bdf)] == depth_of[str(function.parent)] + 1
            assert order.index(str(function.bdf)) > order.index(str(function.parent))


def test_a_bridge_with_a_reset_shows_both_of_its_steps() -> None:
    topology = machine()
    plan = build_plan(topology, Policy(hot_reset=True), SystemFacts())
    line = next(line for _, bdf, line in tree_lines(topology, plan) if bdf == "0000:00:1c.0")
    assert line.endswith("→  unbind (pcieport, has unbind); then reset-bus (bridge, --hot-reset)")


def test_protected_and_kept_functions_show_why() -> None:
    topology = machine()
    plan = build_plan(
        topology,
        policy_of(exclude=["0000:00:1f.*"]),
        SystemFacts(needed={B("0000:02:00.0"): "backs / mounted rw"}),
    )
    text = {bdf: line for _, bdf, line in tree_lines(topology, plan)}
    assert text["0000:02:00.0"].endswith("→  protect (backs / mounted rw)")
    assert text["0000:01:00.0"].endswith("→  protect (above protected 0000:02:00.0)")
    assert text["0000:00:1f.2"].endswith("→  keep (excluded by --exclude 0000:00:1f.*)")


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_every_function_is_in_the_tree_exactly_once_under_its_parent(scenario: Scenario) -> None:
    topology = scenario.topology
    plan = build_plan(topology, scenario.policy, scenario.facts)
    lines = tree_lines(topology, plan)
    assert sorted(bdf for _, bdf, _ in lines) == sorted(str(bdf) for bdf in topology.functions)
    depth_of = {bdf: depth for depth, bdf, _ in lines}
    for function in topology:
        assert depth_of[str(function.bdf)] == topology.depth(function.bdf)
    text = plan_tree(topology, plan)
    assert text.count("PCI domain ") == len(topology.domains)
    for step in plan.steps:
        assert str(step) in text


def test_describe_function_names_address_ids_class_driver_and_role() -> None:
    vf = function("0000:02:00.1", None, parent="0000:01:00.0", physfn="0000:02:00.0")
    assert describe_function(vf) == (
        "0000:02:00.1 15b3:1017 class 020000 driver - [VF of 0000:02:00.0]"
    )


def test_json_lists_the_steps_in_execution_order() -> None:
    topology = machine()
    plan = build_plan(topology, Policy(hot_reset=True), SystemFacts())
    data = json.loads(json.dumps(plan_to_json(topology, plan)))
    assert [(s["bdf"], s["action"]) for s in data["steps"]] == [
        ("0000:02:00.1", "unbind"),  # the VF before its PF
        ("0000:00:00.0", "skip"),
        ("0000:00:1f.2", "unbind"),
        ("0000:02:00.0", "unbind"),
        ("0001:00:00.0", "unbind"),
        ("0000:01:00.0", "unbind"),  # bridges deepest first
        ("0000:00:1c.0", "unbind"),
        ("0000:00:1c.0", "reset-bus"),  # resets last
    ]
    assert data["steps"][0] == {
        "bdf": "0000:02:00.1",
        "action": "unbind",
        "reason": "ixgbevf, has unbind",
        "driver": "ixgbevf",
        "vendor_device": "15b3:1017",
    }
    assert data["conflicts"] == []


def test_json_steps_are_the_plan_steps() -> None:
    topology = machine()
    plan = build_plan(topology, Policy(), SystemFacts())
    steps = plan_to_json(topology, plan)["steps"]
    assert [(s["bdf"], s["action"], s["reason"]) for s in steps] == [
        (str(step.bdf), step.action.value, step.reason) for step in plan.steps
    ]


def test_json_carries_the_conflicts() -> None:
    topology = machine()
    plan = build_plan(
        topology,
        policy_of(only=["nvme"]),
        SystemFacts(needed={B("0001:00:00.0"): "backs / mounted rw"}),
    )
    assert plan_to_json(topology, plan)["conflicts"] == list(plan.conflicts)
    assert len(plan.conflicts) == 1


def test_the_summary_counts_each_action_that_occurs_in_plan_order_of_kinds() -> None:
    topology = machine()
    plan = build_plan(topology, Policy(hot_reset=True), SystemFacts())
    assert plan_summary(plan) == "6 unbind, 1 reset-bus, 1 skip"
    assert len(plan.with_action(Action.UNBIND)) == 6
