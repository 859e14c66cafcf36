"""One bus-reset step on the simulated kernel (petitkexec.busreset): which reset it picks, what
it writes, how long it waits for the functions below to answer, and what it reports."""

from __future__ import annotations

import errno

import pytest

from petitkexec.bdf import Bdf
from petitkexec.busreset import BusResetter
from petitkexec.deadline import Budget, wait_first
from petitkexec.model import PCI_BRIDGE_CONTROL
from petitkexec.outcome import Pending, Status, StepOutcome
from petitkexec.plan import Action, Step
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel, root_port

PORT, NIC, NIC2 = "0000:00:02.0", "0000:01:00.0", "0000:01:00.1"
STEP = Step(Bdf.parse(PORT), Action.RESET_BUS, "hot reset")


def reset(
    sim: SimKernel, raw_sbr: bool = False, timeout_s: float = 2, budget: Budget | None = None
) -> StepOutcome:
    resetter = BusResetter(sim.kernel, sim.topology(), timeout_s, raw_sbr, budget or Budget())
    begun = resetter.begin(STEP)
    if isinstance(begun, Pending):
        assert begun.step == STEP  # what the executor reports and orders by
        _child, result = wait_first([begun.child])
        begun = begun.finish(result)
    assert begun.step == STEP
    return begun


def port_with(*below: SimFunction, **port: object) -> list[SimFunction]:
    return [root_port(PORT, **port), *below]


def nic(bdf: str = NIC, **kwargs: object) -> SimFunction:
    """A function below the port as the teardown leaves it: unbound, bus master off."""
    return SimFunction(bdf, parent=PORT, **{"command": 0x0002, **kwargs})  # type: ignore[arg-type]


def sleeps(sim: SimKernel) -> list[float]:
    return [float(w["data"]) for w in sim.writes() if w["path"] == "sleep"]


def assert_answered_at_once(outcome: StepOutcome, sim: SimKernel, functions: int = 1) -> None:
    """A reset through reset_subordinate after which every function waited for answered at
    the first poll: done, and no sleep recorded."""
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        f"reset_subordinate; {functions} functions answered",
    )
    assert sleeps(sim) == []


def test_reset_subordinate_is_the_first_choice(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(reset_methods=("bus",)), reset_subordinate=True))
    outcome = reset(sim)
    assert_answered_at_once(outcome, sim)
    assert [e.split()[:2] for e in sim.events()] == [[PORT, "reset_subordinate"]]


def test_the_only_function_below_is_reset_through_its_bus_reset_method(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(port_with(nic(reset_methods=("flr", "bus"))))
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        f"bus reset through {NIC} (reset_method bus); 1 functions answered",
    )
    assert f"{NIC} reset:bus" in sim.events()
    assert sim.attribute(NIC, "reset_method") == "flr bus"  # put back as it was


@pytest.mark.parametrize(
    ("below", "why"),
    [
        ([nic(reset_methods=("flr",))], f"{NIC} has no 'bus' reset method"),
        ([nic()], f"{NIC} has no 'bus' reset method"),
        (
            [nic(multifunction=True, reset_methods=("bus",)), nic(NIC2, reset_methods=("bus",))],
            "2 functions on the bus",
        ),
        ([], "0 functions on the bus"),
    ],
)
def test_without_a_kernel_reset_the_step_fails_and_says_why(
    make_sim: SimFactory, below: list[SimFunction], why: str
) -> None:
    sim = make_sim(port_with(*below))
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        f"no kernel-mediated reset (no reset_subordinate; {why}); --raw-sbr allows a raw one",
    )
    assert sim.writes() == []


def test_a_function_gone_from_the_bus_is_not_counted(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(multifunction=True), nic(NIC2, reset_methods=("bus",))))
    topology = sim.topology()
    sim.vanish(NIC)
    resetter = BusResetter(sim.kernel, topology, 2, False)
    begun = resetter.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    outcome = begun.finish(result)
    assert outcome.status is Status.DONE
    assert outcome.detail.startswith(f"bus reset through {NIC2} (reset_method bus); ")


def test_a_raw_sbr_holds_reset_then_waits_before_reading(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()))
    outcome = reset(sim, raw_sbr=True)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        "raw secondary bus reset; 1 functions answered",
    )
    control = [(w["data"], w["offset"]) for w in sim.writes() if w["path"].endswith("/config")]
    assert control == [("4000", PCI_BRIDGE_CONTROL), ("0000", PCI_BRIDGE_CONTROL)]
    assert sleeps(sim) == [0.002, 0.1]  # Trst, then 100 ms before the first config read
    assert sim.raw_sbr_holds[PORT] >= 0.001


def test_a_raw_sbr_keeps_the_other_bridge_control_bits(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()))
    sim.kernel.write_bridge_control(Bdf.parse(PORT), 0x0013)  # parity, SERR, ISA
    outcome = reset(sim, raw_sbr=True)
    assert outcome.status is Status.DONE
    control = [w["data"] for w in sim.writes() if w["offset"] == PCI_BRIDGE_CONTROL]
    assert control[1:] == ["5300", "1300"]


def test_a_raw_sbr_refused_by_lockdown_fails_the_step(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()), lockdown="integrity")
    outcome = reset(sim, raw_sbr=True)
    assert outcome.status is Status.FAILED
    assert outcome.detail.startswith("raw SBR: ") and "EPERM" in outcome.detail
    assert sleeps(sim) == []


def test_a_bridge_reading_all_ones_is_gone_and_not_reset(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()))
    sim.make_config_read_ffff(PORT)
    outcome = reset(sim, raw_sbr=True)
    assert (outcome.status, outcome.detail) == (Status.GONE, "bridge control unreadable")
    assert sim.writes() == []


def test_a_bridge_without_config_is_gone_and_not_reset(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()))
    topology = sim.topology()
    (sim.device_dir(PORT) / "config").unlink()
    outcome = BusResetter(sim.kernel, topology, 2, True).begin(STEP)
    assert isinstance(outcome, StepOutcome) and outcome.step == STEP
    assert (outcome.status, outcome.detail) == (Status.GONE, "bridge control unreadable")
    assert sim.writes() == []


def test_a_raw_sbr_is_refused_on_powernv(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic()))
    (sim.root / "firmware" / "opal").mkdir(parents=True)
    outcome = reset(sim, raw_sbr=True)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        "raw SBR refused on PowerNV (bypasses OPAL)",
    )
    assert sim.writes() == []


def test_a_function_that_never_answers_again_is_waited_for_one_second(
    make_sim: SimFactory,
) -> None:
    port = "0000:00:03.0"
    sim = make_sim(
        [
            *port_with(nic(multifunction=True), nic(NIC2), reset_subordinate=True),
            root_port(port),  # a function elsewhere that does not answer is not waited for
        ]
    )
    sim.make_config_read_ffff(NIC)
    sim.make_config_read_ffff(NIC2)
    sim.make_config_read_ffff(port)
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        f"reset_subordinate; no answer from {NIC2}, {NIC}",
    )
    assert sleeps(sim) == [0.02] * 50  # polled every 20 ms for the kernel's 1 s


def test_a_function_that_answers_late_is_waited_for(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(), reset_subordinate=True))
    sim.make_config_read_ffff(NIC)
    config = bytes(256)
    polls: list[float] = []

    def answering_at_the_third_poll(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:  # link trained: config reads answer again
            (sim.state / f"dead-{NIC}").unlink()
            (sim.device_dir(NIC) / "config").write_bytes(config)

    sim.sleep = answering_at_the_third_poll  # type: ignore[method-assign]
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        "reset_subordinate; 1 functions answered",
    )
    assert polls == [0.02, 0.02, 0.02]


def test_only_a_vendor_id_of_all_ones_is_silence(make_sim: SimFactory) -> None:
    # Bytes 1 and 2 (the vendor ID's high byte, the device ID's low byte) read 0xffff here:
    # the register that says "no answer" is the vendor ID at offset 0, nothing next to it.
    sim = make_sim(port_with(nic(vendor=0xFF01, device=0x10FF), reset_subordinate=True))
    outcome = reset(sim)
    assert_answered_at_once(outcome, sim)


def test_vfs_are_not_waited_for_as_they_read_all_ones_by_design(make_sim: SimFactory) -> None:
    pf = nic(multifunction=True, reset_methods=("bus",))
    vf = SimFunction(NIC2, parent=PORT, physfn=NIC, command=0x0002)
    sim = make_sim(port_with(pf, vf, reset_subordinate=True))
    outcome = reset(sim)
    assert_answered_at_once(outcome, sim)


def test_a_function_gone_after_the_reset_is_not_waited_for(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(multifunction=True), nic(NIC2), reset_subordinate=True))
    topology = sim.topology()
    sim.vanish(NIC2)
    resetter = BusResetter(sim.kernel, topology, 2, False)
    begun = resetter.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    outcome = begun.finish(result)
    assert_answered_at_once(outcome, sim, 2)


def test_bus_master_on_again_after_the_reset_fails_the_step(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(multifunction=True), nic(NIC2), reset_subordinate=True))
    sim.turn_bus_master_back_on(NIC2, when="reset")
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        f"reset_subordinate; bus master on again: {NIC2}",
    )
    sim.turn_bus_master_back_on(NIC, when="reset")
    assert reset(sim).detail == f"reset_subordinate; bus master on again: {NIC2}, {NIC}"


def test_a_refused_reset_is_a_failure_that_still_checks_what_is_below(
    make_sim: SimFactory,
) -> None:
    sim = make_sim(port_with(nic(command=0x0006), reset_subordinate=True))
    sim.fail_write(PORT, "reset_subordinate", errno.EAGAIN)  # nothing reset: bus master stays
    outcome = reset(sim)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        "reset_subordinate refused: EAGAIN; bus master on again: " + NIC,
    )


@pytest.mark.parametrize(
    ("timeout_s", "budget_s", "why"),
    [(0.33, None, "no answer within 0.3 s"), (30, 0.33, "time limit ran out within 0.3 s")],
)
def test_a_reset_that_does_not_return_is_hung_naming_the_child(
    make_sim: SimFactory, timeout_s: float, budget_s: float | None, why: str
) -> None:
    sim = make_sim(port_with(nic(), reset_subordinate=True, reset_seconds=3600))
    resetter = BusResetter(sim.kernel, sim.topology(), timeout_s, False, Budget.of(budget_s))
    begun = resetter.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    outcome = begun.finish(result)
    assert (outcome.status, outcome.detail) == (
        Status.HUNG,
        f"reset_subordinate: {why} (child {result.pid} abandoned)",
    )


def test_a_bus_reset_through_a_function_whose_lock_is_held_is_hung(make_sim: SimFactory) -> None:
    sim = make_sim(port_with(nic(driver="e1000e", reset_methods=("bus",), remove_hangs=True)))
    topology = sim.topology()
    # A remove() that never returned holds the function's device_lock, which the reset takes.
    wait_first([sim.kernel.start_unbind(Bdf.parse(NIC), "e1000e", 0.1)])
    resetter = BusResetter(sim.kernel, topology, 0.33, False)
    begun = resetter.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    outcome = begun.finish(result)
    assert (outcome.status, outcome.detail) == (
        Status.HUNG,
        f"bus reset through {NIC} (reset_method bus): no answer within 0.3 s "
        f"(child {result.pid} abandoned)",
    )
