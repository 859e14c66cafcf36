"""The plan on hand-built topologies: each step and its reason, propagation, order, resets."""

from __future__ import annotations

import pytest

from petitkexec.bdf import Bdf
from petitkexec.model import CONFIG_GONE, PciFunction, SystemFacts, Topology
from petitkexec.plan import Action, Plan, Step, build_plan
from petitkexec.policy import Policy
from tests.builders import BME_OFF, bridge, endpoint, policy_of


def machine() -> list[PciFunction]:
    """A small PC: root-bus devices, a root port with NVMe, a switch with a NIC and an SR-IOV PF."""
    return [
        endpoint("0000:00:00.0", class_code=0x060000, command=0x0000),  # host bridge
        endpoint("0000:00:01.0", class_code=0x030000, command=0x0007),  # VGA, no driver
        endpoint("0000:00:03.0", "virtio-pci", vendor=0x1AF4, device=0x1041),
        bridge("0000:00:1c.0", header_type=0x81),
        endpoint("0000:01:00.0", "nvme", parent="0000:00:1c.0", class_code=0x010802),
        bridge("0000:00:1c.1", header_type=0x81),
        bridge("0000:02:00.0", parent="0000:00:1c.1"),  # switch upstream port
        bridge("0000:03:01.0", parent="0000:02:00.0"),  # switch downstream ports
        bridge("0000:03:02.0", parent="0000:02:00.0"),
        endpoint("0000:04:00.0", "e1000e", parent="0000:03:01.0"),
        endpoint("0000:05:00.0", "mlx5_core", parent="0000:03:02.0"),  # SR-IOV PF
        endpoint("0000:05:00.1", "mlx5_core", parent="0000:03:02.0", physfn="0000:05:00.0"),
        endpoint("0000:05:00.2", None, parent="0000:03:02.0", physfn="0000:05:00.0"),
        endpoint("0000:00:1f.0", "lpc_ich", can_unbind=False, class_code=0x060100),
        endpoint("0000:00:1f.2", "ahci", class_code=0x010601),
        endpoint("0000:00:1f.3", class_code=0x0C0500, command=0x0003),  # SMBus, BME off
    ]


def plan_for(
    functions: list[PciFunction] | None = None,
    policy: Policy | None = None,
    needed: dict[str, str] | None = None,
) -> Plan:
    facts = SystemFacts(needed={Bdf.parse(k): v for k, v in (needed or {}).items()})
    topology = Topology.from_functions(machine() if functions is None else functions)
    return build_plan(topology, policy or Policy(), facts)


def decision(plan: Plan, bdf: str) -> str:
    return str(plan.decision(Bdf.parse(bdf)))


def order(plan: Plan) -> list[str]:
    return [str(step.bdf) for step in plan.steps]


def resets(plan: Plan) -> list[str]:
    """The reset bridges, sorted: their order among themselves is no promise."""
    return sorted(str(step.bdf) for step in plan.with_action(Action.RESET_BUS))


# --- one function's step ----------------------------------------------------------------------


def test_a_driver_with_an_unbind_file_is_unbound() -> None:
    assert decision(plan_for(), "0000:00:03.0") == "unbind (virtio-pci, has unbind)"


def test_a_function_without_driver_and_bus_master_on_gets_bus_master_cleared() -> None:
    assert decision(plan_for(), "0000:00:01.0") == "clear-bus-master (no driver, BME on)"


def test_a_function_without_driver_and_bus_master_off_is_skipped() -> None:
    assert decision(plan_for(), "0000:00:1f.3") == "skip (bus master already off)"


def test_a_driver_without_an_unbind_file_and_bus_master_on_gets_bus_master_cleared() -> None:
    assert decision(plan_for(), "0000:00:1f.0") == (
        "clear-bus-master (lpc_ich cannot be unbound, BME on)"
    )


def test_a_driver_without_an_unbind_file_and_bus_master_off_is_skipped_naming_the_driver() -> None:
    plan = plan_for([endpoint("0000:00:1f.0", "lpc_ich", can_unbind=False, command=BME_OFF)])
    assert decision(plan, "0000:00:1f.0") == (
        "skip (lpc_ich cannot be unbound, bus master already off)"
    )


def test_a_driver_with_an_unbind_file_is_unbound_even_with_bus_master_off() -> None:
    plan = plan_for([endpoint("0000:00:1f.2", "ahci", command=BME_OFF)])
    assert decision(plan, "0000:00:1f.2") == "unbind (ahci, has unbind)"


@pytest.mark.parametrize("command", [None, CONFIG_GONE])
def test_an_unreadable_config_space_is_skipped_and_says_so(command: int | None) -> None:
    plan = plan_for([endpoint("0000:00:05.0", command=command)])
    assert decision(plan, "0000:00:05.0") == "skip (no driver, config space unreadable)"


def test_every_function_gets_exactly_one_decision() -> None:
    plan = plan_for()
    decided = [step.bdf for step in plan.steps if step.action is not Action.RESET_BUS]
    assert sorted(decided) == sorted(f.bdf for f in machine())


def test_decision_of_an_unknown_address_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        plan_for().decision(Bdf.parse("0000:7f:00.0"))


def test_mutating_steps_are_the_unbinds_bus_master_clears_and_resets() -> None:
    plan = plan_for(policy=Policy(hot_reset=True))
    assert {step.action for step in plan.mutating_steps} == {
        Action.UNBIND,
        Action.CLEAR_BUS_MASTER,
        Action.RESET_BUS,
    }
    assert all(step.action.mutates for step in plan.mutating_steps)
    assert not any(a.mutates for a in (Action.SKIP, Action.PROTECT, Action.KEEP))


# --- protection -------------------------------------------------------------------------------


def test_a_function_the_system_needs_is_protected_with_the_reason() -> None:
    plan = plan_for(needed={"0000:01:00.0": "backs / mounted rw"})
    assert decision(plan, "0000:01:00.0") == "protect (backs / mounted rw)"


def test_protection_propagates_to_every_bridge_above() -> None:
    plan = plan_for(needed={"0000:04:00.0": "backs / mounted rw"})
    assert decision(plan, "0000:03:01.0") == "protect (above protected 0000:04:00.0)"
    assert decision(plan, "0000:02:00.0") == "protect (above protected 0000:03:01.0)"
    assert decision(plan, "0000:00:1c.1") == "protect (above protected 0000:02:00.0)"


def test_protection_does_not_spread_to_siblings_or_their_bridges() -> None:
    plan = plan_for(needed={"0000:04:00.0": "backs / mounted rw"})
    assert decision(plan, "0000:03:02.0") == "unbind (pcieport, has unbind)"
    assert decision(plan, "0000:05:00.0") == "unbind (mlx5_core, has unbind)"
    assert decision(plan, "0000:01:00.0") == "unbind (nvme, has unbind)"


def test_protecting_a_vf_protects_its_pf_and_the_bridges_above() -> None:
    plan = plan_for(needed={"0000:05:00.1": "backs /srv mounted rw"})
    assert decision(plan, "0000:05:00.1") == "protect (backs /srv mounted rw)"
    assert decision(plan, "0000:05:00.0") == "protect (PF of protected 0000:05:00.1)"
    assert decision(plan, "0000:03:02.0") == "protect (above protected 0000:05:00.1)"
    assert decision(plan, "0000:05:00.2") == "clear-bus-master (no driver, BME on)"


def test_protecting_a_pf_leaves_its_vfs_to_be_torn_down() -> None:
    plan = plan_for(needed={"0000:05:00.0": "backs / mounted rw"})
    assert decision(plan, "0000:05:00.1") == "unbind (mlx5_core, has unbind)"


def test_unprotect_lifts_protection_from_the_function_and_the_bridges_above() -> None:
    plan = plan_for(
        policy=policy_of(unprotect=["nvme"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert decision(plan, "0000:01:00.0") == (
        "unbind (nvme, has unbind; unprotected: backs / mounted rw)"
    )
    assert decision(plan, "0000:00:1c.0") == "unbind (pcieport, has unbind)"


def test_unprotect_of_another_function_leaves_protection_in_place() -> None:
    plan = plan_for(
        policy=policy_of(unprotect=["ahci"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert decision(plan, "0000:01:00.0") == "protect (backs / mounted rw)"


def test_protection_outranks_keeping_for_a_function_both_needed_and_excluded() -> None:
    plan = plan_for(
        policy=policy_of(exclude=["nvme"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert decision(plan, "0000:01:00.0") == "protect (backs / mounted rw)"
    assert decision(plan, "0000:00:1c.0") == "protect (above protected 0000:01:00.0)"


# --- keeping (policy) -------------------------------------------------------------------------


def test_exclude_keeps_what_it_matches_with_the_spec_as_reason() -> None:
    plan = plan_for(policy=policy_of(exclude=["0000:00:1f.*"]))
    for bdf in ("0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"):
        assert decision(plan, bdf) == "keep (excluded by --exclude 0000:00:1f.*)"
    assert decision(plan, "0000:00:03.0") == "unbind (virtio-pci, has unbind)"


def test_keeping_propagates_to_the_bridges_above() -> None:
    plan = plan_for(policy=policy_of(exclude=["e1000e"]))
    assert decision(plan, "0000:04:00.0") == "keep (excluded by --exclude e1000e)"
    assert decision(plan, "0000:03:01.0") == "keep (above kept 0000:04:00.0)"
    assert decision(plan, "0000:02:00.0") == "keep (above kept 0000:03:01.0)"
    assert decision(plan, "0000:00:1c.1") == "keep (above kept 0000:02:00.0)"
    assert decision(plan, "0000:03:02.0") == "unbind (pcieport, has unbind)"


def test_keeping_a_vf_keeps_its_pf() -> None:
    plan = plan_for(policy=policy_of(exclude=["0000:05:00.2"]))
    assert decision(plan, "0000:05:00.0") == "keep (PF of kept 0000:05:00.2)"
    assert decision(plan, "0000:05:00.1") == "unbind (mlx5_core, has unbind)"


def test_only_tears_down_the_selection_and_keeps_the_rest() -> None:
    plan = plan_for(policy=policy_of(only=["virtio-pci"]))
    assert decision(plan, "0000:00:03.0") == "unbind (virtio-pci, has unbind)"
    assert decision(plan, "0000:00:1f.2") == "keep (not selected by --only)"
    assert [str(step.bdf) for step in plan.mutating_steps] == ["0000:00:03.0"]


def test_only_selecting_a_protected_function_is_a_conflict() -> None:
    plan = plan_for(
        policy=policy_of(only=["nvme"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert decision(plan, "0000:01:00.0") == "protect (backs / mounted rw)"
    assert plan.conflicts == (
        "--only selects 0000:01:00.0 but it is protected (backs / mounted rw); "
        "add --unprotect 0000:01:00.0 to tear it down anyway",
    )


def test_only_selecting_unprotected_functions_has_no_conflict() -> None:
    plan = plan_for(
        policy=policy_of(only=["ahci"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert plan.conflicts == ()


def test_protection_without_only_is_no_conflict() -> None:
    assert plan_for(needed={"0000:01:00.0": "backs / mounted rw"}).conflicts == ()


def test_unprotect_resolves_the_only_conflict() -> None:
    plan = plan_for(
        policy=policy_of(only=["nvme"], unprotect=["0000:01:00.0"]),
        needed={"0000:01:00.0": "backs / mounted rw"},
    )
    assert plan.conflicts == ()
    assert plan.decision(Bdf.parse("0000:01:00.0")).action is Action.UNBIND


# --- order ------------------------------------------------------------------------------------


def test_vfs_come_before_their_pf() -> None:
    steps = order(plan_for())
    assert steps.index("0000:05:00.1") < steps.index("0000:05:00.0")
    assert steps.index("0000:05:00.2") < steps.index("0000:05:00.0")


def test_endpoints_come_before_bridges_and_deeper_bridges_before_shallower() -> None:
    steps = order(plan_for())
    assert steps.index("0000:04:00.0") < steps.index("0000:03:01.0")
    assert steps.index("0000:03:01.0") < steps.index("0000:02:00.0")
    assert steps.index("0000:03:02.0") < steps.index("0000:02:00.0")
    assert steps.index("0000:02:00.0") < steps.index("0000:00:1c.1")
    assert steps.index("0000:01:00.0") < steps.index("0000:00:1c.0")


@pytest.mark.parametrize(("command", "header_type"), [(CONFIG_GONE, 0xFF), (None, None)])
def test_a_bridge_whose_config_space_reads_gone_still_comes_after_the_functions_below_it(
    command: int | None, header_type: int | None
) -> None:
    # An EEH-frozen or link-down port reads 0xff everywhere, header type included; the topology
    # still knows what is below it, and unbinding its pcieport first would cut their DMA.
    plan = plan_for(
        [
            bridge("0000:00:1c.0", command=command, header_type=header_type),
            endpoint("0000:01:00.0", "nvme", parent="0000:00:1c.0"),
        ]
    )
    assert order(plan) == ["0000:01:00.0", "0000:00:1c.0"]
    assert plan.steps[0].wave < plan.steps[1].wave


def test_waves_run_vfs_then_endpoints_then_bridges_deepest_first_then_resets() -> None:
    plan = plan_for(policy=Policy(hot_reset=True))
    waves: dict[int, set[str]] = {}
    for step in plan.steps:
        waves.setdefault(step.wave, set()).add(f"{step.bdf} {step.action.value}")
    assert [sorted(waves[wave]) for wave in sorted(waves)] == [
        ["0000:05:00.1 unbind", "0000:05:00.2 clear-bus-master"],
        [
            "0000:00:00.0 skip",
            "0000:00:01.0 clear-bus-master",
            "0000:00:03.0 unbind",
            "0000:00:1f.0 clear-bus-master",
            "0000:00:1f.2 unbind",
            "0000:00:1f.3 skip",
            "0000:01:00.0 unbind",
            "0000:04:00.0 unbind",
            "0000:05:00.0 unbind",
        ],
        ["0000:03:01.0 unbind", "0000:03:02.0 unbind"],
        ["0000:02:00.0 unbind"],
        ["0000:00:1c.0 unbind", "0000:00:1c.1 unbind"],
        ["0000:00:1c.0 reset-bus", "0000:00:1c.1 reset-bus"],
    ]


# --- resets -----------------------------------------------------------------------------------


def switch_machine() -> list[PciFunction]:
    return [
        bridge("0000:00:1c.0"),
        bridge("0000:01:00.0", parent="0000:00:1c.0"),
        bridge("0000:02:01.0", parent="0000:01:00.0"),
        bridge("0000:02:02.0", parent="0000:01:00.0"),
        endpoint("0000:03:00.0", "nvme", parent="0000:02:01.0"),
        endpoint("0000:04:00.0", "e1000e", parent="0000:02:02.0"),
        bridge("0000:00:1c.1"),
        endpoint("0000:05:00.0", "xhci_hcd", parent="0000:00:1c.1"),
        bridge("0000:00:1c.2"),  # an empty root port
    ]


def test_hot_reset_resets_only_the_topmost_bridge_of_a_torn_down_subtree() -> None:
    plan = plan_for(switch_machine(), Policy(hot_reset=True))
    assert resets(plan) == ["0000:00:1c.0", "0000:00:1c.1"]
    assert str(plan.steps[-1]) == "reset-bus (bridge, --hot-reset)"


def test_no_reset_without_hot_reset() -> None:
    assert resets(plan_for(switch_machine())) == []


def test_an_empty_bridge_is_not_reset() -> None:
    assert "0000:00:1c.2" not in resets(plan_for(switch_machine(), Policy(hot_reset=True)))


def test_resets_come_after_every_other_step() -> None:
    plan = plan_for(switch_machine(), Policy(hot_reset=True))
    kinds = [step.action is Action.RESET_BUS for step in plan.steps]
    assert kinds == sorted(kinds)
    assert kinds.count(True) == 2


def test_a_bridge_above_a_protected_function_is_not_reset_but_a_sibling_subtree_is() -> None:
    plan = plan_for(
        switch_machine(), Policy(hot_reset=True), needed={"0000:03:00.0": "backs / mounted rw"}
    )
    assert resets(plan) == ["0000:00:1c.1", "0000:02:02.0"]


def test_a_bridge_above_a_kept_function_is_not_reset() -> None:
    plan = plan_for(switch_machine(), policy_of(exclude=["e1000e"], hot_reset=True))
    assert resets(plan) == ["0000:00:1c.1", "0000:02:01.0"]


def test_a_bridge_above_a_driver_that_stays_bound_with_bus_master_off_is_not_reset() -> None:
    functions = [
        bridge("0000:00:1c.0"),
        endpoint("0000:01:00.0", "vfio-pci", parent="0000:00:1c.0", can_unbind=False, command=0),
    ]
    assert resets(plan_for(functions, Policy(hot_reset=True))) == []


def test_a_bridge_above_a_driver_that_stays_bound_with_bus_master_on_is_not_reset() -> None:
    # The driver has no unbind file, so the plan only clears bus master: the driver is still
    # bound and driving the function when the bus would be reset under it.
    functions = [
        bridge("0000:00:1c.0"),
        endpoint("0000:01:00.0", "vfio-pci", parent="0000:00:1c.0", can_unbind=False),
    ]
    plan = plan_for(functions, Policy(hot_reset=True))
    assert decision(plan, "0000:01:00.0") == (
        "clear-bus-master (vfio-pci cannot be unbound, BME on)"
    )
    assert resets(plan) == []


def test_a_bridge_above_an_unbound_function_with_bus_master_on_is_reset() -> None:
    functions = [bridge("0000:00:1c.0"), endpoint("0000:01:00.0", None, parent="0000:00:1c.0")]
    plan = plan_for(functions, Policy(hot_reset=True))
    assert plan.steps == (
        Step(Bdf.parse("0000:01:00.0"), Action.CLEAR_BUS_MASTER, "no driver, BME on"),
        Step(Bdf.parse("0000:00:1c.0"), Action.UNBIND, "pcieport, has unbind"),
        Step(Bdf.parse("0000:00:1c.0"), Action.RESET_BUS, "bridge, --hot-reset"),
    )


def test_a_kept_bridge_is_not_reset_though_its_subtree_is_torn_down() -> None:
    plan = plan_for(switch_machine(), policy_of(exclude=["0000:00:1c.1"], hot_reset=True))
    assert "0000:00:1c.1" not in resets(plan)
    assert "0000:00:1c.0" in resets(plan)


def test_nested_bridges_are_reset_when_the_top_one_cannot_be() -> None:
    functions = [*switch_machine(), endpoint("0000:01:00.1", "ahci", parent="0000:00:1c.0")]
    plan = plan_for(functions, policy_of(exclude=["ahci"], hot_reset=True))
    assert resets(plan) == ["0000:00:1c.1", "0000:01:00.0"]


def test_an_only_spec_that_matches_nothing_is_a_conflict_with_a_hint_for_domains() -> None:
    # On PowerNV every PHB is a domain; "0000:*" reads as vendor 0000, any device.
    functions = [endpoint("0001:01:00.0", "nvme"), endpoint("0000:01:00.0", "e1000e")]
    plan = plan_for(functions, policy_of(only=["0000:*"]))
    assert plan.conflicts == (
        "--only 0000:* matches no PCI function (read as vendor:device; for PCI domain 0000 "
        "write 0000:*:*.*)",
    )
    assert plan_for(functions, policy_of(only=["0000:*:*.*"])).conflicts == ()
