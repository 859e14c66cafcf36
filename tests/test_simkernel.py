"""The simulated kernel behaves as the kernel does where petitkexec's defensive code lives, and
that code is seen doing its job against it (each test names the kernel function it imitates)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.busmaster import BusMasterClearer
from petitkexec.busreset import SBR_ASSERT_S, SBR_SETTLE_S, BusResetter
from petitkexec.deadline import wait_first
from petitkexec.execute import ExecutionOptions, Status, Teardown, TeardownReport
from petitkexec.journal import Journal
from petitkexec.model import PCI_COMMAND, SystemFacts
from petitkexec.plan import Action, Step, build_plan
from petitkexec.policy import Policy
from tests.conftest import SimFactory
from tests.simkernel import EPROBE_DEFER, SimFunction, SimKernel, root_port

NIC = "0000:01:00.0"
PORT = "0000:00:02.0"


def behind_a_port(**nic: object) -> list[SimFunction]:
    return [root_port(PORT), SimFunction(NIC, parent=PORT, driver="e1000e", **nic)]  # type: ignore[arg-type]


def run(
    sim: SimKernel, policy: Policy | None = None, **options: object
) -> tuple[Teardown, TeardownReport]:
    topology = sim.topology()
    plan = build_plan(topology, policy or Policy(), SystemFacts())
    teardown = Teardown(sim.kernel, topology, plan, ExecutionOptions(**options))  # type: ignore[arg-type]
    return teardown, teardown.run()


def outcome_of(report: TeardownReport, bdf: str, action: Action):  # type: ignore[no-untyped-def]
    return next(o for o in report.outcomes if str(o.step.bdf) == bdf and o.step.action is action)


def write_error(sim: SimKernel, path: Path, data: bytes) -> int:
    with pytest.raises(OSError) as raised:
        sim.write(path, data)
    return raised.value.errno or 0


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """For what a forked child does in its own time (on a loaded machine, later than asked)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def step(bdf: str, action: Action) -> Step:
    return Step(Bdf.parse(bdf), action, "test")


# -- 1. `enable` is a count ---------------------------------------------------------------------


def test_enable_0_takes_one_off_the_count_and_clears_bus_master_only_at_0(
    make_sim: SimFactory,
) -> None:
    # enable_store() → pci_disable_device(): atomic_dec_return(&enable_cnt), and
    # do_pci_disable_device() (the bus master clear) only when that reaches 0.
    sim = make_sim([SimFunction(NIC, enable_count=2), SimFunction("0000:00:04.0", driver="nvme")])
    enable = sim.device_dir(NIC) / "enable"
    sim.write(enable, b"0")
    assert (sim.attribute(NIC, "enable"), sim.bus_master_on(NIC)) == ("1", True)
    sim.write(enable, b"0")
    assert (sim.attribute(NIC, "enable"), sim.bus_master_on(NIC)) == ("0", False)
    assert write_error(sim, enable, b"0") == errno.EIO  # not enabled
    assert write_error(sim, sim.device_dir("0000:00:04.0") / "enable", b"0") == errno.EBUSY


def test_a_managed_driver_unbound_with_a_count_above_1_leaves_bus_master_on(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    # pcim_enable_device()'s release calls pci_disable_device() once: a q35 root port whose
    # count is 2 keeps bus master after pcieport is unbound, and petitkexec clears it.
    sim = make_sim([root_port(PORT, enable_count=2)])
    sim.write(sim.device_dir(PORT) / "driver_override", b"none")
    sim.write(sim.root / "bus/pci/drivers/pcieport/unbind", PORT.encode())
    assert (sim.enable_count(PORT), sim.bus_master_on(PORT)) == (1, True)

    sim = SimKernel(tmp_path / "teardown" / "sys", [root_port(PORT, enable_count=2)])
    _, report = run(sim)
    assert "pcieport; driver left bus master on" in outcome_of(report, PORT, Action.UNBIND).detail
    assert not sim.bus_master_on(PORT)


# -- 2. an unbind cannot be interrupted and holds the device lock ------------------------------


def test_a_hung_remove_outlives_sigkill_holds_the_device_lock_and_unbinds_when_it_returns(
    make_sim: SimFactory,
) -> None:
    # unbind_store() → device_release_driver_internal(): device_lock() held across remove();
    # the write sleeps uninterruptibly, so SIGKILL waits until remove() returns.
    sim = make_sim(behind_a_port(remove_hangs=True))
    kernel, nic = sim.kernel, Bdf.parse(NIC)
    kernel.set_driver_override(nic, "none")
    unbind = kernel.start_unbind(nic, "e1000e", 0.2)
    assert wait_until(lambda: sim.is_locked(NIC))  # remove() running
    assert not wait_first([unbind])[1].finished  # abandoned: SIGKILL sent
    assert os.waitpid(unbind.pid, os.WNOHANG) == (0, 0)  # ... and still alive
    assert sim.is_locked(NIC) and sim.driver_of(NIC) == "e1000e"
    # A second unbind and driver_set_override() take the same lock: they wait too.
    for blocked in (
        kernel.start_unbind(nic, "e1000e", 0.2),
        kernel.start_set_driver_override(nic, "none", 0.2),
    ):
        assert not wait_first([blocked])[1].finished
    sim.release(NIC)
    assert wait_until(lambda: os.waitpid(unbind.pid, os.WNOHANG) != (0, 0))
    assert sim.driver_of(NIC) is None  # remove() returned: unbound ...
    # ... and `none` still applied when it did: nothing bound it again; the override write
    # that waited ran after the unbind (driver_set_override() got the lock then).
    assert "probed" not in " ".join(sim.events())


def test_remove_waits_for_the_device_lock_and_takes_everything_below(
    make_sim: SimFactory,
) -> None:
    # remove_store() → pci_stop_and_remove_bus_device_locked(): the subtree goes, each driver's
    # remove() under its device's lock, so it waits for a remove() already running.
    sim = make_sim(behind_a_port(remove_seconds=1.5))
    kernel = sim.kernel
    kernel.set_driver_override(Bdf.parse(NIC), "none")
    kernel.start_unbind(Bdf.parse(NIC), "e1000e", 60)
    assert wait_until(lambda: sim.is_locked(NIC))
    began = time.monotonic()
    sim.write(sim.device_dir(PORT) / "remove", b"1")
    nic_removed = sim.remove_spans()[NIC][1]
    assert began < nic_removed < time.monotonic()  # waited for the unbind's remove()
    assert not sim.exists(NIC) and not sim.exists(PORT)
    assert f"{PORT} removed" in " ".join(sim.events())  # pcieport's remove() ran too


def test_a_remove_stuck_past_sigkill_does_not_hold_up_the_teardown(
    make_sim: SimFactory,
) -> None:
    # Kills a blocking waitpid() on the abandoned child (deadline.py): the child lives until
    # remove() returns (2 s), the run must not wait for it.
    sim = make_sim(behind_a_port(remove_seconds=2.0))
    began = time.monotonic()
    _, report = run(sim, unbind_timeout_s=0.3)
    assert time.monotonic() - began < 1.5
    assert outcome_of(report, NIC, Action.UNBIND).status is Status.HUNG
    assert sim.is_locked(NIC)
    assert wait_until(lambda: not sim.is_locked(NIC))
    # remove() returned after the run gave up on it: unbound, with `none` keeping udev off it
    # until the rollback's driver_override write, waiting on the same lock, landed. Then it is
    # bindable again (udev's probe after the unbind may even have bound it already).
    assert wait_until(lambda: sim.attribute(NIC, "driver_override") == "(null)")
    assert wait_until(lambda: sim.driver_of(NIC) in (None, "e1000e"))


# -- 3. config writes that do not land --------------------------------------------------------


def test_a_dead_link_drops_config_writes_and_reads_stay_all_ones(make_sim: SimFactory) -> None:
    # pci_user_write_config_word(): the platform accessor's error is swallowed, the count is
    # returned; nothing reaches a function behind a dead link or an EEH-frozen slot.
    sim = make_sim(behind_a_port())
    sim.make_config_read_ffff(NIC)
    sim.kernel.write_command(Bdf.parse(NIC), 0xFFFB)
    assert sim.command_of(NIC) == 0xFFFF


def test_a_config_write_that_is_dropped_leaves_bus_master_on_and_is_reported(
    make_sim: SimFactory,
) -> None:
    # Kills "the read-back after a bus-master clear ignored" (busmaster.py).
    sim = make_sim([SimFunction(NIC)])
    sim.drop_config_writes(NIC)
    clearer = BusMasterClearer(sim.kernel, Journal(undo_timeout_s=1))
    result = clearer.clear(step(NIC, Action.CLEAR_BUS_MASTER))
    assert result.status is Status.FAILED
    assert result.detail == "bus master still on after write (COMMAND 0x0006)"


def test_bus_master_switched_on_again_at_once_is_reported(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC)])
    sim.turn_bus_master_back_on(NIC)
    clearer = BusMasterClearer(sim.kernel, Journal(undo_timeout_s=1))
    result = clearer.clear(step(NIC, Action.CLEAR_BUS_MASTER))
    assert result.status is Status.FAILED and "bus master still on after write" in result.detail
    assert [w["data"] for w in sim.writes() if w["offset"] == PCI_COMMAND] == ["0200"]


def test_bus_master_on_again_after_a_bus_reset_fails_the_reset_step(make_sim: SimFactory) -> None:
    # pci_dev_restore() after a secondary bus reset, then firmware or a driver sets bus
    # master again: the step that reset the bus reads it back and says so.
    sim = make_sim([root_port(PORT, reset_subordinate=True), SimFunction(NIC, parent=PORT)])
    sim.turn_bus_master_back_on(NIC, when="reset")
    _, report = run(sim, Policy(hot_reset=True))
    assert outcome_of(report, NIC, Action.CLEAR_BUS_MASTER).status is Status.DONE
    reset = outcome_of(report, PORT, Action.RESET_BUS)
    assert reset.status is Status.FAILED
    assert reset.detail == f"reset_subordinate; bus master on again: {NIC}"


def test_an_enable_count_that_does_not_go_down_is_reported(make_sim: SimFactory) -> None:
    # Under lockdown the clear goes through `enable`; a count someone else holds stays.
    sim = make_sim([SimFunction(NIC, enable_count=2)], lockdown="integrity")
    sim.hold_enable_count(NIC)
    clearer = BusMasterClearer(sim.kernel, Journal(undo_timeout_s=1))
    result = clearer.clear(step(NIC, Action.CLEAR_BUS_MASTER))
    assert result.status is Status.FAILED
    assert result.detail == "config writes blocked; enable count still 2 after 2 disables"
    assert sim.bus_master_on(NIC)


# -- 4. no file, no write ------------------------------------------------------------------------


def test_writes_to_attributes_that_do_not_exist_answer_enoent(make_sim: SimFactory) -> None:
    # sysfs: a driver with suppress_bind_attrs has no bind/unbind files (bus_add_driver()
    # skips add_bind_files()); reset_subordinate exists only where the kernel has it.
    sim = make_sim(
        [
            root_port(PORT),
            SimFunction(NIC, parent=PORT, driver="lpc_ich", can_unbind=False),
        ]
    )
    drivers = sim.root / "bus" / "pci" / "drivers"
    assert write_error(sim, drivers / "lpc_ich" / "unbind", NIC.encode()) == errno.ENOENT
    assert write_error(sim, drivers / "lpc_ich" / "bind", NIC.encode()) == errno.ENOENT
    assert write_error(sim, sim.device_dir(PORT) / "reset_subordinate", b"1") == errno.ENOENT
    assert write_error(sim, sim.device_dir(NIC) / "reset", b"1") == errno.ENOENT
    assert sim.driver_of(NIC) == "lpc_ich"


# -- 5. secondary bus resets: timings and what comes back -------------------------------------


def test_a_raw_sbr_is_held_then_given_time_to_settle_before_config_is_read(
    make_sim: SimFactory,
) -> None:
    # Kills "the secondary-bus-reset hold removed" (busreset.py): pci_reset_secondary_bus()
    # holds the reset ≥ 1 ms (2 ms), then waits ≥ 100 ms before the first config access.
    sim = make_sim([root_port(PORT, driver=None), SimFunction(NIC, parent=PORT)])
    resetter = BusResetter(sim.kernel, sim.topology(), 1.0, raw_sbr_allowed=True)
    result = resetter.begin(step(PORT, Action.RESET_BUS))
    assert result.status is Status.DONE  # type: ignore[union-attr]
    timeline = [
        (w["path"], w["data"]) for w in sim.writes() if w["path"] == "sleep" or w["offset"] == 0x3E
    ]
    config = f"bus/pci/devices/{PORT}/config"
    assert timeline == [
        (config, "4000"),
        ("sleep", f"{SBR_ASSERT_S:g}"),
        (config, "0000"),
        ("sleep", f"{SBR_SETTLE_S:g}"),
    ]
    assert sim.raw_sbr_holds[PORT] >= 0.001
    assert sim.command_of(NIC) == 0x0000  # a raw reset: nothing restored


KERNEL_BUS_RESETS = {
    "reset_subordinate": [root_port(PORT, reset_subordinate=True), SimFunction(NIC, parent=PORT)],
    "reset_method bus": [root_port(PORT), SimFunction(NIC, parent=PORT, reset_methods=("bus",))],
}


@pytest.mark.parametrize("how", KERNEL_BUS_RESETS)
def test_a_kernel_bus_reset_restores_bus_master_as_saved_so_it_is_cleared_before(
    make_sim: SimFactory, tmp_path: Path, how: str
) -> None:
    # __pci_reset_bus() and pci_reset_function() → pci_parent_bus_reset(): config saved and
    # disabled, the reset, config restored — bus master on before the reset is on after it.
    sim = make_sim(KERNEL_BUS_RESETS[how])
    resetter = BusResetter(sim.kernel, sim.topology(), 1.0, raw_sbr_allowed=False)
    pending = resetter.begin(step(PORT, Action.RESET_BUS))
    late = pending.finish(wait_first([pending.child])[1])  # type: ignore[union-attr]
    assert late.status is Status.FAILED and late.detail.endswith(f"bus master on again: {NIC}")

    sim = SimKernel(tmp_path / "teardown" / "sys", KERNEL_BUS_RESETS[how])
    _, report = run(sim, Policy(hot_reset=True))
    assert outcome_of(report, PORT, Action.RESET_BUS).status is Status.DONE
    order = [w["path"] for w in sim.writes() if w["path"] != "sleep"]
    cleared = order.index(f"bus/pci/devices/{NIC}/config")
    reset_file = {
        "reset_subordinate": f"{PORT}/reset_subordinate",
        "reset_method bus": f"{NIC}/reset",
    }
    assert cleared < order.index(f"bus/pci/devices/{reset_file[how]}")
    assert not sim.bus_master_on(NIC)


def test_a_bus_reset_cannot_lock_a_device_a_hung_remove_holds(make_sim: SimFactory) -> None:
    # __pci_reset_bus(): pci_bus_trylock() fails → EAGAIN.
    sim = make_sim([root_port(PORT, reset_subordinate=True), *behind_a_port(remove_hangs=True)[1:]])
    kernel = sim.kernel
    kernel.set_driver_override(Bdf.parse(NIC), "none")
    kernel.start_unbind(Bdf.parse(NIC), "e1000e", 60)
    assert wait_until(lambda: sim.is_locked(NIC))
    result = wait_first([kernel.start_reset_subordinate(Bdf.parse(PORT), 1.0)])[1]
    assert result.finished and result.errno == errno.EAGAIN


def test_a_rollback_after_a_stuck_bus_reset_never_waits_on_the_locks_it_holds(
    make_sim: SimFactory,
) -> None:
    # __pci_reset_bus() holds config access and the device lock of everything below until it
    # returns: `enable` (enable_store() → device_lock()) waits, so the rollback's re-enable of a
    # function cleared through `enable` (lockdown) runs in a child with a deadline.
    sim = make_sim(
        [
            root_port(PORT, reset_subordinate=True, reset_seconds=3600),
            SimFunction(NIC, parent=PORT),
        ],
        lockdown="integrity",
    )
    began = time.monotonic()
    _, report = run(sim, Policy(hot_reset=True), reset_timeout_s=0.5, unbind_timeout_s=1)
    assert time.monotonic() - began < 10
    assert outcome_of(report, PORT, Action.RESET_BUS).status is Status.HUNG
    undone = {(str(r.undo.bdf), r.undo.kind.value): r for r in report.rollback}
    assert "ETIMEDOUT" in undone[(NIC, "re-enable")].detail
    assert undone[(PORT, "rebind")].ok  # the bridge itself is not below its own reset


# -- 6. drivers bind on their own ----------------------------------------------------------------


def test_udev_binds_a_driver_again_after_an_unbind_unless_the_override_is_none(
    make_sim: SimFactory,
) -> None:
    # pci_match_device(): driver_override `none` matches no driver.
    sim = make_sim(behind_a_port())
    unbind = sim.root / "bus/pci/drivers/e1000e/unbind"
    sim.write(unbind, NIC.encode())
    assert sim.driver_of(NIC) == "e1000e"
    assert f"{NIC} probed e1000e" in sim.events()
    sim.write(sim.device_dir(NIC) / "driver_override", b"none")
    sim.write(unbind, NIC.encode())
    assert sim.driver_of(NIC) is None
    assert sim.late_probe(NIC) is None and sim.driver_of(NIC) is None
    sim.write(sim.device_dir(NIC) / "driver_override", b"vfio-pci")  # driverctl's way
    # An override names a driver: while none by that name is registered, nothing matches.
    assert sim.late_probe(NIC) is None and sim.driver_of(NIC) is None
    assert sim.load_driver("vfio-pci") == [NIC] and sim.driver_of(NIC) == "vfio-pci"


def test_driver_override_none_is_written_before_the_unbind(make_sim: SimFactory) -> None:
    # Kills "driver_override written after the unbind" (unbind.py): "udev" rebinds between.
    sim = make_sim(behind_a_port())
    _, report = run(sim)
    assert outcome_of(report, NIC, Action.UNBIND).status is Status.DONE
    paths = [w["path"] for w in sim.writes()]
    assert paths.index(f"bus/pci/devices/{NIC}/driver_override") < paths.index(
        "bus/pci/drivers/e1000e/unbind"
    )
    assert sim.driver_of(NIC) is None
    assert sim.late_probe(NIC) is None  # a late probe before the kexec finds nothing to bind


def test_a_deferred_probe_binds_later_unless_the_override_is_none(make_sim: SimFactory) -> None:
    # really_probe() → -EPROBE_DEFER, driver_deferred_probe_add(); the probe runs again at
    # driver_deferred_probe_trigger().
    sim = make_sim(
        [
            SimFunction(NIC, probe_defers=True),
            SimFunction("0000:00:04.0", probe_defers=True),
            SimFunction("0000:00:05.0", driver="e1000e"),
        ]
    )
    bind = sim.root / "bus/pci/drivers/e1000e/bind"
    for bdf in (NIC, "0000:00:04.0"):
        assert write_error(sim, bind, bdf.encode()) == EPROBE_DEFER
    sim.write(sim.device_dir("0000:00:04.0") / "driver_override", b"none")
    assert sim.fire_deferred_probes() == [NIC]
    assert (sim.driver_of(NIC), sim.driver_of("0000:00:04.0")) == ("e1000e", None)


def sriov_pf() -> list[SimFunction]:
    pf = SimFunction(NIC, parent=PORT, driver="ixgbe", multifunction=True)
    vfs = [
        SimFunction(f"0000:01:00.{n}", parent=PORT, physfn=NIC, driver="ixgbevf") for n in (1, 2)
    ]
    return [root_port(PORT), pf, *vfs]


def test_sriov_numvfs_0_removes_the_vfs_and_autoprobe_decides_whether_new_vfs_bind(
    make_sim: SimFactory,
) -> None:
    # sriov_numvfs_store() → sriov_configure(0) → pci_disable_sriov() removes the VFs;
    # pci_iov_add_virtfn() probes a new VF only if sriov_drivers_autoprobe is 1.
    sim = make_sim(sriov_pf())
    numvfs, vfs = sim.device_dir(NIC) / "sriov_numvfs", ["0000:01:00.1", "0000:01:00.2"]
    sim.write(numvfs, b"0")
    assert not any(sim.exists(vf) for vf in vfs)
    sim.write(numvfs, b"2")
    assert [sim.driver_of(vf) for vf in vfs] == ["ixgbevf", "ixgbevf"]
    assert write_error(sim, numvfs, b"1") == errno.EBUSY  # 0 first
    sim.write(numvfs, b"0")
    sim.write(sim.device_dir(NIC) / "sriov_drivers_autoprobe", b"0")
    sim.write(numvfs, b"2")
    assert [sim.driver_of(vf) for vf in vfs] == [None, None]


# -- VFs beyond the PF's slot ------------------------------------------------------------------


def pf_with_vfs_on_two_buses() -> list[SimFunction]:
    """An SR-IOV PF at 01:00.0 whose VFs fill 01:00.x and 01:01.x and spill onto bus 02 (ARI
    routing IDs: VF n is at the PF's routing ID + First VF Offset + n * VF Stride)."""
    pf = SimFunction(NIC, parent=PORT, driver="ixgbe", multifunction=True, remove_seconds=0.1)
    vfs = [
        SimFunction(bdf, parent=PORT, physfn=NIC, driver="ixgbevf", remove_seconds=seconds)
        for bdf, seconds in (
            ("0000:01:00.1", 0.2),
            ("0000:01:01.0", 0.8),
            ("0000:02:00.0", 0.8),
        )
    ]
    return [root_port(PORT), pf, *vfs]


def test_a_pf_waits_for_its_vfs_in_other_slots_and_on_other_buses(make_sim: SimFactory) -> None:
    # Kills "a PF no longer waiting for its VFs" (execute.py): pci_device_remove() of the PF
    # disables SR-IOV and deletes the VFs, whatever slot or bus they sit on.
    sim = make_sim(pf_with_vfs_on_two_buses())
    _, report = run(sim)
    assert not report.failed
    spans = sim.remove_spans()
    vfs = [f.bdf for f in sim.vfs_of(NIC)]
    assert spans[NIC][0] >= max(spans[vf][1] for vf in vfs)
