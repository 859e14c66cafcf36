"""The teardown against a simulated kernel that behaves as KERNEL-FACTS.md says."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

import petitkexec.execute
from petitkexec.bdf import Bdf
from petitkexec.execute import ExecutionOptions, Status, Teardown, TeardownReport
from petitkexec.model import SystemFacts
from petitkexec.plan import Action, build_plan
from petitkexec.policy import Policy
from petitkexec.unbind import Unbinder
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel, root_port


def run(
    sim: SimKernel,
    policy: Policy | None = None,
    facts: SystemFacts | None = None,
    **options: object,
) -> tuple[Teardown, TeardownReport]:
    topology = sim.topology()
    plan = build_plan(topology, policy or Policy(), facts or SystemFacts())
    teardown = Teardown(sim.kernel, topology, plan, ExecutionOptions(**options))  # type: ignore[arg-type]
    return teardown, teardown.run()


def outcome(report: TeardownReport, bdf: str, action: Action | None = None):  # type: ignore[no-untyped-def]
    for item in report.outcomes:
        if str(item.step.bdf) == bdf and (action is None or item.step.action is action):
            return item
    raise AssertionError(f"no outcome for {bdf}")


def unprotected(sim: SimKernel) -> list[str]:
    return [f.bdf for f in sim.functions if sim.exists(f.bdf)]


def test_default_teardown_leaves_every_function_without_driver_or_bus_master(
    make_sim: SimFactory,
) -> None:
    sim = make_sim()
    _, report = run(sim)
    assert not report.failed
    for bdf in unprotected(sim):
        if bdf == "0000:00:1f.0":  # lpc_ich suppresses bind attrs: stays bound, BME cleared
            assert sim.driver_of(bdf) == "lpc_ich"
            assert not sim.bus_master_on(bdf)
            continue
        assert sim.driver_of(bdf) is None, bdf
        assert not sim.bus_master_on(bdf), bdf


def test_unbind_sets_driver_override_none_so_nothing_rebinds(make_sim: SimFactory) -> None:
    sim = make_sim()
    run(sim)
    assert sim.attribute("0000:02:00.0", "driver_override") == "none"


def test_driver_that_leaves_bus_master_on_gets_it_cleared_after_unbind(
    make_sim: SimFactory,
) -> None:
    sim = make_sim()
    _, report = run(sim)
    e1000e = outcome(report, "0000:02:00.0")
    assert e1000e.status is Status.DONE
    assert "driver left bus master on" in e1000e.detail
    assert e1000e.bus_master_after is False
    xhci = outcome(report, "0000:03:00.0")  # pcim-managed: remove() disabled the device itself
    assert xhci.detail == "unbound from xhci_hcd; bus master off"


def test_vfs_are_unbound_before_their_pf_and_survive_until_then(make_sim: SimFactory) -> None:
    sim = make_sim()
    _, report = run(sim)
    order = [str(o.step.bdf) for o in report.outcomes]
    assert order.index("0000:01:00.1") < order.index("0000:01:00.0")
    assert outcome(report, "0000:01:00.1").detail.startswith("unbound from nvme")


def test_pf_unbind_removes_vfs_in_the_simulated_kernel(make_sim: SimFactory) -> None:
    sim = make_sim()
    run(sim)
    assert not sim.exists("0000:01:00.1")
    assert not sim.exists("0000:01:00.2")


def test_driverless_bridge_with_bus_master_on_is_cleared(make_sim: SimFactory) -> None:
    sim = make_sim()
    _, report = run(sim)
    assert outcome(report, "0000:00:02.3").detail == "bus master cleared"
    assert sim.command_of("0000:00:02.3") == 0x0103


def test_config_write_is_a_16_bit_read_modify_write_of_command(make_sim: SimFactory) -> None:
    sim = make_sim()
    run(sim)
    writes = [w for w in sim.writes() if w["path"].endswith("0000:00:02.3/config")]
    assert writes == [{"path": "bus/pci/devices/0000:00:02.3/config", "data": "0301", "offset": 4}]


def test_dry_run_changes_nothing(make_sim: SimFactory) -> None:
    sim = make_sim()
    before = {bdf: (sim.driver_of(bdf), sim.command_of(bdf)) for bdf in unprotected(sim)}
    _, report = run(sim, dry_run=True)
    assert sim.writes() == []
    assert {bdf: (sim.driver_of(bdf), sim.command_of(bdf)) for bdf in unprotected(sim)} == before
    assert {o.status for o in report.outcomes} <= {Status.WOULD, Status.HELD}


def test_protected_function_and_the_bridge_above_are_never_written(make_sim: SimFactory) -> None:
    sim = make_sim()
    facts = SystemFacts(needed={Bdf.parse("0000:01:00.0"): "backs / mounted rw"})
    _, report = run(sim, facts=facts)
    touched = {w["path"].split("/")[3] for w in sim.writes() if w["path"].startswith("bus/pci/dev")}
    touched |= {w["data"] for w in sim.writes() if w["path"].endswith("unbind")}
    assert "0000:01:00.0" not in touched
    assert "0000:00:02.0" not in touched
    assert sim.driver_of("0000:01:00.0") == "nvme"
    assert outcome(report, "0000:00:02.0").step.action is Action.PROTECT


def test_lockdown_falls_back_to_enable_for_driverless_functions(make_sim: SimFactory) -> None:
    sim = make_sim(lockdown="integrity")
    _, report = run(sim)
    bridge_outcome = outcome(report, "0000:00:02.3")
    assert bridge_outcome.status is Status.DONE
    assert "through enable" in bridge_outcome.detail
    assert not sim.bus_master_on("0000:00:02.3")
    e1000e = outcome(report, "0000:02:00.0")  # unbound first, so `enable` is allowed
    assert e1000e.status is Status.DONE and not sim.bus_master_on("0000:02:00.0")


def test_lockdown_with_a_driver_that_cannot_unbind_reports_bus_master_left_on(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(lockdown="integrity")
    _, report = run(sim)
    lpc = outcome(report, "0000:00:1f.0")
    assert lpc.status is Status.FAILED
    assert "lpc_ich is bound: bus master left on" in lpc.detail
    assert sim.bus_master_on("0000:00:1f.0")
    assert report.summary()["failed"] == ["0000:00:1f.0"]


def test_disabled_driverless_function_is_enabled_then_disabled_under_lockdown(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(
        [SimFunction("0000:00:05.0", enable_count=0, command=0x0004)], lockdown="integrity"
    )
    _, report = run(sim)
    assert outcome(report, "0000:00:05.0").status is Status.DONE
    assert sim.attribute("0000:00:05.0", "enable") == "0"
    assert not sim.bus_master_on("0000:00:05.0")


HUNG_WAVE = [
    SimFunction("0000:00:03.0", driver="e1000e"),
    SimFunction("0000:00:04.0", driver="virtio-pci", remove_hangs=True),
    SimFunction("0000:00:05.0", driver="ahci"),
    root_port("0000:00:1c.0"),
]


def test_hung_remove_one_at_a_time_stops_at_once_and_rolls_back(make_sim: SimFactory) -> None:
    sim = make_sim(HUNG_WAVE)
    _, report = run(sim, unbind_timeout_s=2, jobs=1)
    assert report.hung == (Bdf.parse("0000:00:04.0"),)
    assert outcome(report, "0000:00:04.0").status is Status.HUNG
    assert "did not return within 2 s" in (report.stopped_because or "")
    assert not report.handoff_safe
    # nothing after the hung step was attempted, and the earlier unbind was undone
    assert [str(o.step.bdf) for o in report.outcomes] == ["0000:00:03.0", "0000:00:04.0"]
    assert sim.driver_of("0000:00:03.0") == "e1000e"
    assert sim.attribute("0000:00:03.0", "driver_override") == "(null)"
    assert sim.driver_of("0000:00:05.0") == "ahci"
    # The abandoned unbind is journalled too: its driver_override write waits in a child on
    # the device lock the stuck remove() holds, and the undo says so instead of "ok".
    assert report.rollback[0].undo.describe() == "rebind 0000:00:04.0 to virtio-pci"
    assert "still holds device_lock" in report.rollback[0].detail
    assert [r.ok for r in report.rollback] == [False, True, True]


def test_hung_remove_side_by_side_lets_the_others_in_flight_finish_then_rolls_back(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(HUNG_WAVE)
    _, report = run(sim, unbind_timeout_s=2)
    assert report.hung == (Bdf.parse("0000:00:04.0"),)
    # Nothing waits for anything here (the root port has nothing below it): all four started
    # side by side, the three others finished, and the hung one came last, at its deadline.
    assert [str(o.step.bdf) for o in report.outcomes][-1] == "0000:00:04.0"
    assert {str(o.step.bdf) for o in report.outcomes} == {f.bdf for f in HUNG_WAVE}
    for function in HUNG_WAVE:
        assert sim.driver_of(function.bdf) == function.driver  # rolled back (or still stuck)
    hung = [r for r in report.rollback if str(r.undo.bdf) == "0000:00:04.0"]
    assert len(hung) == 1 and not hung[0].ok and "still holds device_lock" in hung[0].detail
    assert all(r.ok for r in report.rollback if r not in hung)


def test_unbinds_of_different_slots_overlap_and_functions_of_one_slot_do_not(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(
        [
            SimFunction("0000:00:03.0", driver="e1000e", multifunction=True, remove_seconds=0.2),
            SimFunction("0000:00:03.1", driver="e1000e", remove_seconds=0.2),
            SimFunction("0000:00:04.0", driver="nvme", remove_seconds=0.2),
        ]
    )
    _, report = run(sim)
    assert not report.failed
    spans = sim.remove_spans()
    assert spans["0000:00:04.0"][0] < spans["0000:00:03.0"][1]  # nvme ran beside function 0
    first, second = sorted([spans["0000:00:03.0"], spans["0000:00:03.1"]])
    assert first[1] <= second[0]  # the two functions of one device ran one after the other


def test_unbind_refused_by_the_kernel_is_a_failure_and_the_override_is_restored(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction("0000:00:03.0", driver="e1000e")])
    sim.fail_write("0000:00:03.0", "unbind", errno.EBUSY)
    _, report = run(sim)
    failed = outcome(report, "0000:00:03.0")
    assert failed.status is Status.FAILED and "still bound to e1000e" in failed.detail
    assert "EBUSY" in failed.detail
    assert sim.attribute("0000:00:03.0", "driver_override") == "(null)"


def test_function_reading_ffff_is_reported_gone_and_the_run_goes_on(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction("0000:00:03.0"), SimFunction("0000:00:04.0")])
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    sim.make_config_read_ffff("0000:00:03.0")  # frozen after discovery (EEH, link down)
    report = Teardown(sim.kernel, topology, plan).run()
    gone = outcome(report, "0000:00:03.0")
    assert gone.status is Status.GONE and "0xffff" in gone.detail
    assert report.summary()["gone"] == ["0000:00:03.0"]
    assert not [w for w in sim.writes() if "0000:00:03.0" in w["path"]]
    assert not sim.bus_master_on("0000:00:04.0")


def test_function_reading_ffff_at_discovery_is_skipped_by_the_plan(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction("0000:00:03.0")])
    sim.make_config_read_ffff("0000:00:03.0")
    plan = build_plan(sim.topology(), Policy(), SystemFacts())
    assert (
        str(plan.decision(Bdf.parse("0000:00:03.0"))) == "skip (no driver, config space unreadable)"
    )


def test_function_that_vanishes_before_its_step_is_reported_gone(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction("0000:00:03.0", driver="e1000e"), SimFunction("0000:00:04.0")])
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    sim.vanish("0000:00:03.0")
    report = Teardown(sim.kernel, topology, plan).run()
    assert outcome(report, "0000:00:03.0").status is Status.GONE
    assert not sim.bus_master_on("0000:00:04.0")
    assert not report.failed


def test_rollback_rebinds_drivers_restores_command_and_brings_the_vfs_back(
    make_sim: SimFactory,
) -> None:
    sim = make_sim()
    before = {bdf: (sim.driver_of(bdf), sim.command_of(bdf)) for bdf in unprotected(sim)}
    teardown, _report = run(sim)
    assert not sim.exists("0000:01:00.1")  # unbinding the PF removed its VFs
    results = teardown.journal.rollback(sim.kernel)
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert "restore 2 VFs on 0000:01:00.0" in [r.undo.describe() for r in results]
    assert sim.attribute("0000:01:00.0", "sriov_numvfs") == "2"
    for bdf, (driver, command) in before.items():
        assert sim.driver_of(bdf) == driver, bdf
        assert sim.command_of(bdf) & 0x4 == command & 0x4, bdf
        assert sim.attribute(bdf, "driver_override") == "(null)"


def test_sigterm_during_teardown_stops_issuing_steps_and_rolls_back(make_sim: SimFactory) -> None:
    sim = make_sim()
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    # Whatever handler the process had (SIG_DFL in a shell, the runner's own under mutmut's
    # fork server) is the one the run puts back.
    handler_before = signal.getsignal(signal.SIGTERM)

    def signal_after_second(index: int, _total: int, _outcome: object) -> None:
        if index == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    report = Teardown(sim.kernel, topology, plan, on_outcome=signal_after_second).run()
    assert report.interrupted and report.stopped_because == "interrupted by SIGTERM"
    # The two instant steps, then only the unbind already in flight (the first VF's): nothing
    # started after the signal.
    assert [str(o.step.bdf) for o in report.outcomes][2:] == ["0000:01:00.1"]
    assert sim.driver_of("0000:01:00.1") == "nvme"  # the VF unbound first was rebound
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_hot_reset_prefers_reset_subordinate_then_child_bus_reset(make_sim: SimFactory) -> None:
    sim = make_sim()
    _, report = run(sim, policy=Policy(hot_reset=True))
    events = sim.events()
    assert any(event.startswith("0000:00:02.1 reset_subordinate") for event in events)
    assert "0000:03:00.0 reset:bus" in events
    assert sim.attribute("0000:03:00.0", "reset_method") == "bus"
    assert outcome(report, "0000:00:02.1", Action.RESET_BUS).status is Status.DONE


def test_hot_reset_without_a_kernel_method_fails_unless_raw_sbr_allowed(
    make_sim: SimFactory,
) -> None:
    functions = [
        root_port("0000:00:02.0"),
        SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="e1000e", multifunction=True),
        SimFunction("0000:01:00.1", parent="0000:00:02.0", driver="e1000e"),
    ]
    sim = make_sim(functions)
    _, report = run(sim, policy=Policy(hot_reset=True))
    refused = outcome(report, "0000:00:02.0", Action.RESET_BUS)
    assert refused.status is Status.FAILED and "--raw-sbr" in refused.detail
    assert "raw-sbr" not in " ".join(sim.events())


def test_raw_sbr_toggles_bridge_control_when_allowed(make_sim: SimFactory) -> None:
    functions = [
        root_port("0000:00:02.0"),
        SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="e1000e"),
    ]
    sim = make_sim(functions)
    _, report = run(sim, policy=Policy(hot_reset=True), raw_sbr=True)
    assert outcome(report, "0000:00:02.0", Action.RESET_BUS).status is Status.DONE
    control_writes = [w["data"] for w in sim.writes() if w["offset"] == 0x3E]
    assert control_writes == ["4000", "0000"]


def test_raw_sbr_is_refused_on_powernv(make_sim: SimFactory) -> None:
    functions = [
        root_port("0000:00:02.0", driver=None),
        SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="e1000e"),
    ]
    sim = make_sim(functions)
    (sim.root / "firmware" / "opal").mkdir(parents=True)
    _, report = run(sim, policy=Policy(hot_reset=True), raw_sbr=True)
    refused = outcome(report, "0000:00:02.0", Action.RESET_BUS)
    assert refused.status is Status.FAILED and "PowerNV" in refused.detail
    assert not [w for w in sim.writes() if w["offset"] == 0x3E]


def test_a_refused_reset_subordinate_is_reported_with_the_kernels_errno_and_not_retried(
    make_sim: SimFactory,
) -> None:
    # QEMU's root ports: the kernel resets the bus, then gives up waiting for Data Link Layer
    # Link Active and answers ENOTTY (config below is restored all the same).
    sim = make_sim()
    sim.fail_write("0000:00:02.1", "reset_subordinate", errno.ENOTTY)
    _, report = run(sim, policy=Policy(hot_reset=True))
    refused = outcome(report, "0000:00:02.1", Action.RESET_BUS)
    assert refused.status is Status.FAILED
    assert refused.detail == "reset_subordinate refused: ENOTTY; 1 functions answered"
    assert not any(event.startswith("0000:02:00.0 reset") for event in sim.events())


def test_resets_of_independent_bridges_run_side_by_side(make_sim: SimFactory) -> None:
    sim = make_sim(
        [
            root_port("0000:00:02.0", reset_subordinate=True, reset_seconds=0.2),
            SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="nvme"),
            root_port("0000:00:03.0", reset_subordinate=True, reset_seconds=0.2),
            SimFunction("0000:02:00.0", parent="0000:00:03.0", driver="e1000e"),
        ]
    )
    _, report = run(sim, policy=Policy(hot_reset=True))
    assert not report.failed
    spans = {}
    for event in sim.events():
        bdf, word, *times = event.split()
        if word == "reset_subordinate":
            spans[bdf] = (float(times[0]), float(times[1]))
    first, second = sorted(spans.values())
    assert second[0] < first[1]


def test_a_bridge_waits_only_for_what_is_below_it_not_for_a_slow_device_elsewhere(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(
        [
            root_port("0000:00:02.0"),
            SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="nvme", remove_seconds=0.6),
            root_port("0000:00:03.0"),
            SimFunction("0000:02:00.0", parent="0000:00:03.0", driver="e1000e"),
        ]
    )
    _, report = run(sim)
    spans = sim.remove_spans()
    # The other root port went as soon as its own NIC had: long before the slow NVMe was done.
    assert spans["0000:00:03.0"][1] < spans["0000:01:00.0"][1] - 0.3
    # Its own root port waited for it.
    assert spans["0000:00:02.0"][0] >= spans["0000:01:00.0"][1]
    assert [step for step, _ms in report.critical_path] == [
        "unbind 0000:01:00.0",
        "unbind 0000:00:02.0",
    ]
    assert report.critical_path_ms <= report.wall_ms
    assert report.wall_ms < 600 + 400  # the critical path plus the fast steps, not their sum


def test_a_pf_waits_for_its_vfs_in_other_slots_and_on_other_buses(make_sim: SimFactory) -> None:
    # A VF's routing ID is the PF's plus First VF Offset and VF Stride: with ARI, or many VFs,
    # it lands in another slot or on another bus number (pci_iov_virtfn_bus()). Unbinding the
    # PF removes its VFs (sriov_disable()), so their own unbinds must have finished first,
    # even though they hold no slot the PF's unbind could wait on.
    sim = make_sim(
        [
            root_port("0000:00:02.0"),
            SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="mlx5_core"),
            *(
                SimFunction(
                    vf,
                    parent="0000:00:02.0",
                    physfn="0000:01:00.0",
                    driver="mlx5_core",
                    remove_seconds=0.2,
                )
                for vf in ("0000:01:01.0", "0000:02:00.0")
            ),
        ]
    )
    _, report = run(sim)
    assert not report.failed
    spans = sim.remove_spans()
    pf_began = spans["0000:01:00.0"][0]
    for vf in ("0000:01:01.0", "0000:02:00.0"):
        assert outcome(report, vf).detail.startswith("unbound from mlx5_core"), vf
        assert spans[vf][1] <= pf_began, vf
    assert spans["0000:00:02.0"][0] >= spans["0000:01:00.0"][1]
    assert [step for step, _ms in report.critical_path][-2:] == [
        "unbind 0000:01:00.0",
        "unbind 0000:00:02.0",
    ]


# -- an exception in the step loop: the unbinds in flight are waited for and journalled ---------

TWO_NICS = [
    SimFunction("0000:00:03.0", driver="e1000e"),
    SimFunction("0000:00:04.0", driver="e1000e", remove_seconds=0.4),
]


def raising_after_first_outcome(index: int, _total: int, _outcome: object) -> None:
    if index == 1:
        raise RuntimeError("report could not be written")


def test_an_exception_in_the_loop_waits_for_the_unbind_in_flight_and_journals_it(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(TWO_NICS)
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    teardown = Teardown(sim.kernel, topology, plan, on_outcome=raising_after_first_outcome)
    with pytest.raises(RuntimeError, match="report could not be written"):
        teardown.run()
    # The slow NIC's remove() ran to its end before the exception left, and is journalled, so
    # the rollback neither races it nor forgets to bind its driver again.
    assert not sim.is_locked("0000:00:04.0")
    assert sim.driver_of("0000:00:04.0") is None
    assert {str(undo.bdf) for undo in teardown.journal.entries} == {"0000:00:03.0", "0000:00:04.0"}
    results = teardown.rollback()
    assert "rebind 0000:00:04.0 to e1000e" in [r.undo.describe() for r in results]
    assert all(r.ok for r in results)
    assert sim.driver_of("0000:00:03.0") == sim.driver_of("0000:00:04.0") == "e1000e"


def test_an_unbind_in_flight_that_fails_to_finish_does_not_hide_the_loops_exception(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(TWO_NICS)
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    teardown = Teardown(sim.kernel, topology, plan, on_outcome=raising_after_first_outcome)
    finish = Unbinder._finish

    def failing_finish(self, step, *args):  # type: ignore[no-untyped-def]
        if str(step.bdf) == "0000:00:04.0":
            raise OSError(errno.EIO, "sysfs read failed")
        return finish(self, step, *args)

    monkeypatch.setattr(Unbinder, "_finish", failing_finish)
    with pytest.raises(RuntimeError, match="report could not be written"):
        teardown.run()
    assert not sim.is_locked("0000:00:04.0")  # waited for all the same


# -- the read-back right before the handoff ----------------------------------------------------

DRIVERLESS = "0000:00:05.0"  # no driver, bus master on: a clear-bus-master step
WITH_DRIVERLESS = [SimFunction("0000:00:03.0", driver="e1000e"), SimFunction(DRIVERLESS)]


def test_read_back_with_nothing_come_back_is_the_report_itself(make_sim: SimFactory) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim)
    assert teardown.read_back(report) is report


def test_read_back_marks_a_function_bound_again_failed_without_stopping(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim)
    sim.probe_under_way(DRIVERLESS, "e1000e")
    looked = teardown.read_back(report)
    assert looked.stopped_because is None and looked.rollback == ()
    back = outcome(looked, DRIVERLESS)
    assert back.status is Status.FAILED
    assert back.detail == "bus master cleared; came back: bound to e1000e again before the handoff"
    assert back.driver_after == "e1000e"  # what bound it, not what the step saw
    assert outcome(looked, "0000:00:03.0") == outcome(report, "0000:00:03.0")
    assert (looked.wall_ms, looked.critical_path) == (report.wall_ms, report.critical_path)
    assert sim.driver_of("0000:00:03.0") is None  # nothing rolled back


def test_read_back_clears_bus_master_switched_on_again(make_sim: SimFactory) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim)
    sim._set_command(DRIVERLESS, sim.command_of(DRIVERLESS) | 0x4)
    looked = teardown.read_back(report)
    assert looked.stopped_because is None and looked.rollback == ()
    assert "came back: bus master on again before the handoff; cleared again" in (
        outcome(looked, DRIVERLESS).detail
    )
    assert not sim.bus_master_on(DRIVERLESS)


def test_read_back_stops_and_rolls_back_when_bus_master_cannot_be_cleared_again(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim)
    sim._set_command(DRIVERLESS, sim.command_of(DRIVERLESS) | 0x4)
    sim.fail_write(DRIVERLESS, "config", errno.EIO)
    looked = teardown.read_back(report)
    assert (looked.stopped_because or "").startswith("bus master on again and not clearable")
    assert DRIVERLESS in (looked.stopped_because or "")
    assert outcome(looked, DRIVERLESS).status is Status.FAILED
    assert not looked.handoff_safe
    assert "rebind 0000:00:03.0 to e1000e" in [r.undo.describe() for r in looked.rollback]
    assert sim.driver_of("0000:00:03.0") == "e1000e"


def test_read_back_leaves_a_stopped_run_and_a_dry_run_as_they_are(make_sim: SimFactory) -> None:
    sim = make_sim(HUNG_WAVE)
    teardown, report = run(sim, unbind_timeout_s=1, jobs=1)
    assert report.stopped_because is not None
    # The rollback bound 0000:00:03.0 again: a read-back now would call that "came back".
    assert sim.driver_of("0000:00:03.0") == "e1000e"
    assert teardown.read_back(report) is report
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim, dry_run=True)
    assert teardown.read_back(report) is report


# -- a stop signal after the step loop ----------------------------------------------------------


def test_a_signal_after_the_loop_stops_the_run_and_rolls_it_back(make_sim: SimFactory) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    teardown, report = run(sim)
    assert teardown.stop_if_signalled(report) is report  # no signal: nothing to do
    teardown.signals.received.append("SIGTERM")
    stopped = teardown.stop_if_signalled(report)
    assert stopped.stopped_because == "interrupted by SIGTERM"
    assert stopped.interrupted and not stopped.handoff_safe
    assert stopped.outcomes == report.outcomes
    assert {r.undo.describe() for r in stopped.rollback} >= {"rebind 0000:00:03.0 to e1000e"}
    assert all(r.ok for r in stopped.rollback)
    assert sim.driver_of("0000:00:03.0") == "e1000e"
    assert teardown.stop_if_signalled(stopped) is stopped  # already stopped: not twice


def test_a_dry_run_says_what_each_step_would_do_and_the_driver_and_command_it_found(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    _, report = run(sim, dry_run=True)
    for bdf, driver in (("0000:00:03.0", "e1000e"), (DRIVERLESS, None)):
        would = outcome(report, bdf)
        assert would.status is Status.WOULD
        assert would.detail == str(would.step)  # e.g. "unbind (bound to e1000e)"
        # the JSON's driver_after and command_after: what is there now, since nothing changed
        assert would.driver_after == sim.driver_of(bdf) == driver
        assert would.command_after == sim.command_of(bdf) == 0x0006


def test_two_hung_unbinds_are_both_named_in_why_the_run_stopped(make_sim: SimFactory) -> None:
    sim = make_sim(
        [
            SimFunction("0000:00:03.0", driver="virtio-pci", remove_hangs=True),
            SimFunction("0000:00:04.0", driver="virtio-pci", remove_hangs=True),
        ]
    )
    _, report = run(sim, unbind_timeout_s=0.5)
    assert report.hung == (Bdf.parse("0000:00:03.0"), Bdf.parse("0000:00:04.0"))
    first, second = (outcome(report, bdf).detail for bdf in ("0000:00:03.0", "0000:00:04.0"))
    assert report.stopped_because == (
        f"unbind of 0000:00:03.0: {first}; unbind of 0000:00:04.0: {second}"
    )


def test_a_time_limit_that_runs_out_after_the_last_step_stops_nothing(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction("0000:00:03.0", driver="e1000e")])
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())

    def slow_to_report(index: int, total: int, _outcome: object) -> None:
        if index == total:
            time.sleep(0.3)  # printing the last line, say, past the limit

    options = ExecutionOptions(time_limit_s=0.2)
    teardown = Teardown(sim.kernel, topology, plan, options, on_outcome=slow_to_report)
    report = teardown.run()
    assert teardown.budget.exhausted
    assert report.stopped_because is None and report.rollback == ()
    assert report.handoff_safe
    assert sim.driver_of("0000:00:03.0") is None  # not rolled back


def dry_run_teardown(sim: SimKernel) -> Teardown:
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    return Teardown(sim.kernel, topology, plan, ExecutionOptions(dry_run=True))


class OneJumpClock:
    """time.monotonic() for execute: the run's start, then 1.23456 s later for every read."""

    def __init__(self) -> None:
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return 0.0 if self.reads == 1 else 1.23456


def test_the_wall_time_is_reported_in_milliseconds_to_a_tenth(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    teardown = dry_run_teardown(make_sim(WITH_DRIVERLESS))
    monkeypatch.setattr(petitkexec.execute, "time", OneJumpClock())
    report = teardown.run()
    assert report.wall_ms == 1234.6  # what --json prints as wall_ms
    assert [o.elapsed_ms for o in report.outcomes] == [0.0, 0.0]


def test_a_run_in_which_no_step_finished_has_an_empty_critical_path(make_sim: SimFactory) -> None:
    _, report = run(make_sim([]))  # a machine without PCI (s390x's CCW, a microVM)
    assert (report.outcomes, report.critical_path, report.stopped_because) == ((), (), None)
    sim = make_sim(WITH_DRIVERLESS)
    topology = sim.topology()
    teardown = Teardown(sim.kernel, topology, build_plan(topology, Policy(), SystemFacts()))
    teardown.signals.received.append("SIGTERM")  # came before the first step
    report = teardown.run()
    assert (report.outcomes, report.critical_path) == ((), ())
    assert report.stopped_because == "interrupted by SIGTERM"
    assert sim.writes() == []


def test_the_time_limit_cuts_a_reset_short_too(make_sim: SimFactory) -> None:
    sim = make_sim(
        [
            root_port("0000:00:02.0", reset_subordinate=True, reset_seconds=3600),
            SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="e1000e"),
        ]
    )
    began = time.monotonic()
    _, report = run(
        sim, policy=Policy(hot_reset=True), reset_timeout_s=30, unbind_timeout_s=0.5, time_limit_s=1
    )
    reset = outcome(report, "0000:00:02.0", Action.RESET_BUS)
    assert reset.status is Status.HUNG
    assert reset.detail.startswith("reset_subordinate: time limit ran out within ")
    assert time.monotonic() - began < 10  # not the reset's own 30 s


def test_each_outcome_is_reported_with_its_position_and_the_number_of_steps(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(WITH_DRIVERLESS)
    topology = sim.topology()
    plan = build_plan(topology, Policy(), SystemFacts())
    seen: list[tuple[int, int, str]] = []
    Teardown(
        sim.kernel,
        topology,
        plan,
        on_outcome=lambda index, total, done: seen.append((index, total, str(done.step.bdf))),
    ).run()
    assert sorted(seen) == [(1, 2, DRIVERLESS), (2, 2, "0000:00:03.0")]


class TickingClock:
    """time.monotonic() for execute: 12.3456 ms later at every read."""

    def __init__(self) -> None:
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.reads * 0.0123456


def test_each_steps_time_is_reported_in_milliseconds_to_a_hundredth(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    teardown = dry_run_teardown(make_sim(WITH_DRIVERLESS))
    monkeypatch.setattr(petitkexec.execute, "time", TickingClock())
    report = teardown.run()
    assert [o.elapsed_ms for o in report.outcomes] == [12.35, 12.35]  # one read apart
