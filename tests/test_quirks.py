"""Quirks from the field: shown in the plan's reasons, acted on where they say so, and each
one can be turned off."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.errors import UsageError
from petitkexec.model import SystemFacts, Topology
from petitkexec.plan import Action, Plan, build_plan
from petitkexec.policy import Policy
from petitkexec.quirks import QUIRKS
from tests.builders import bridge, endpoint, policy_of
from tests.clirun import environment, invoke
from tests.conftest import SimFactory
from tests.simkernel import root_port

LS7A_PORT = dataclasses.replace(bridge("0000:00:09.0"), vendor=0x0014, device=0x7A29)


def plan_of(*functions: object, policy: Policy | None = None, powernv: bool = False) -> Plan:
    topology = Topology.from_functions(functions)  # type: ignore[arg-type]
    return build_plan(topology, policy or policy_of(), SystemFacts(powernv=powernv))


def test_every_quirk_says_where_it_was_learned() -> None:
    assert len({q.id for q in QUIRKS}) == len(QUIRKS)
    assert all(q.source and q.says for q in QUIRKS)


def test_an_nvidia_unbind_says_its_remove_may_wait() -> None:
    plan = plan_of(endpoint("0000:41:00.0", "nvidia", class_code=0x030200))
    reason = plan.decision(Bdf.parse("0000:41:00.0")).reason
    assert reason.startswith("nvidia, has unbind; quirk nvidia-remove-waits: remove() waits")
    assert "NVIDIA/open-gpu-kernel-modules #1374" in reason


def test_an_xhci_on_powernv_is_told_about_ppc_pci_reset_phbs_but_not_elsewhere() -> None:
    xhci = endpoint("0000:03:00.0", "xhci_hcd", class_code=0x0C0330)
    on_power = plan_of(xhci, powernv=True).decision(xhci.bdf).reason
    assert "quirk xhci-powernv-halt" in on_power and "op-build #307" in on_power
    assert "quirk" not in plan_of(xhci).decision(xhci.bdf).reason


def test_an_ls7a_root_port_never_gets_its_bus_master_cleared() -> None:
    unbound = plan_of(LS7A_PORT).decision(LS7A_PORT.bdf)
    assert unbound.action is Action.UNBIND and unbound.keep_bus_master
    driverless = dataclasses.replace(LS7A_PORT, driver=None, driver_can_unbind=False)
    skipped = plan_of(driverless).decision(driverless.bdf)
    assert skipped.action is Action.SKIP
    assert "quirk loongson-ls7a-root-port: clearing bus master" in skipped.reason


def test_ignore_quirk_turns_one_off() -> None:
    driverless = dataclasses.replace(LS7A_PORT, driver=None, driver_can_unbind=False)
    plan = plan_of(driverless, policy=policy_of(ignore_quirks=["loongson-ls7a-root-port"]))
    assert plan.decision(driverless.bdf).action is Action.CLEAR_BUS_MASTER


def test_an_unknown_quirk_id_is_a_usage_error_listing_the_known_ones() -> None:
    with pytest.raises(UsageError) as raised:
        policy_of(ignore_quirks=["nope"])
    assert str(raised.value).startswith("--ignore-quirk: 'nope' is not a quirk; known: ")


def test_a_keep_bus_master_unbind_leaves_bus_master_as_the_driver_left_it(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    functions = [
        root_port("0000:00:02.0", vendor=0x0014, device=0x7A09, remove_clears_master=False)
    ]
    sim = make_sim(functions)
    result = invoke(environment(sim, tmp_path), "teardown")
    assert "unbound from pcieport; bus master left (quirk)" in result.stderr
    assert sim.driver_of("0000:00:02.0") is None and sim.bus_master_on("0000:00:02.0")
    assert not any(w["path"].endswith("/config") for w in sim.writes())
