"""One unbind step on the simulated kernel (petitkexec.unbind): what it writes, what it
journals and what it reports, for each way the kernel answers."""

from __future__ import annotations

import errno

from petitkexec.bdf import Bdf
from petitkexec.busmaster import BusMasterClearer
from petitkexec.deadline import Budget, wait_first
from petitkexec.journal import Journal, Undo, UndoKind
from petitkexec.outcome import Pending, Status, StepOutcome
from petitkexec.plan import Action, Step
from petitkexec.unbind import Unbinder, unbind_deadline_s
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel

NIC = "0000:00:03.0"
STEP = Step(Bdf.parse(NIC), Action.UNBIND, "e1000e, has unbind")


def unbind(sim: SimKernel, step: Step = STEP, timeout_s: float = 2) -> tuple[StepOutcome, Journal]:
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(sim.kernel, journal, BusMasterClearer(sim.kernel, journal), timeout_s)
    begun = unbinder.begin(step)
    if isinstance(begun, Pending):
        assert begun.step == step  # what the executor reports and orders by
        _child, result = wait_first([begun.child])
        begun = begun.finish(result)
    assert begun.step == step
    return begun, journal


def test_an_unbind_that_leaves_bus_master_on_is_journalled_then_cleared(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", command=0x0406)])
    outcome, journal = unbind(sim)
    assert (outcome.status, outcome.detail, outcome.command_after) == (
        Status.DONE,
        "unbound from e1000e; driver left bus master on: bus master cleared",
        0x0402,
    )
    assert sim.driver_of(NIC) is None and not sim.bus_master_on(NIC)
    assert [(w["path"].rsplit("/", 1)[1], w["data"]) for w in sim.writes()][:2] == [
        ("driver_override", "none"),  # first: nothing may bind it again
        ("unbind", NIC),
    ]
    assert journal.entries == [
        Undo(UndoKind.REBIND, Bdf.parse(NIC), driver="e1000e", driver_override=None),
        Undo(UndoKind.RESTORE_COMMAND, Bdf.parse(NIC), command=0x0406),
    ]


def test_a_pf_journals_its_vfs_before_its_rebind(make_sim: SimFactory) -> None:
    sim = make_sim()
    pf = Bdf.parse("0000:01:00.0")
    for vf in ("0000:01:00.1", "0000:01:00.2"):
        unbind(sim, Step(Bdf.parse(vf), Action.UNBIND, "nvme, has unbind"))
    outcome, journal = unbind(sim, Step(pf, Action.UNBIND, "nvme, has unbind"))
    assert outcome.status is Status.DONE
    assert [(u.kind, u.numvfs) for u in journal.entries[:2]] == [
        (UndoKind.RESTORE_SRIOV, 2),
        (UndoKind.REBIND, 0),
    ]
    assert journal.entries[1] == Undo(UndoKind.REBIND, pf, driver="nvme", driver_override=None)


def test_a_quirk_that_keeps_bus_master_leaves_it_on(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", command=0x0406)])
    step = Step(Bdf.parse(NIC), Action.UNBIND, "e1000e, has unbind", keep_bus_master=True)
    outcome, journal = unbind(sim, step)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        "unbound from e1000e; bus master left (quirk)",
    )
    assert sim.bus_master_on(NIC)
    assert [u.kind for u in journal.entries] == [UndoKind.REBIND]


def test_a_refused_unbind_puts_the_override_back_and_journals_nothing(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    (sim.device_dir(NIC) / "driver_override").write_text("e1000e\n")
    sim.fail_write(NIC, "unbind", errno.EBUSY)
    outcome, journal = unbind(sim)
    assert (outcome.status, outcome.detail, outcome.driver_after) == (
        Status.FAILED,
        "still bound to e1000e after unbind (EBUSY)",
        "e1000e",
    )
    assert sim.attribute(NIC, "driver_override") == "e1000e"
    assert journal.entries == []


def test_a_refused_driver_override_stops_the_step_before_the_unbind(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    sim.fail_write(NIC, "driver_override", errno.EPERM)
    outcome, journal = unbind(sim)
    assert (outcome.status, outcome.driver_after) == (Status.FAILED, "e1000e")
    assert outcome.detail.startswith("driver_override: ") and "EPERM" in outcome.detail
    assert not any(w["path"].endswith("/unbind") for w in sim.writes())
    assert journal.entries == [] and sim.driver_of(NIC) == "e1000e"


def test_a_remove_that_never_returns_is_hung_naming_the_child(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", remove_hangs=True)])
    outcome, journal = unbind(sim, timeout_s=0.5)
    assert outcome.status is Status.HUNG
    assert outcome.detail.startswith("e1000e remove() did not return within 0.5 s (child ")
    assert outcome.detail.endswith(" abandoned; e1000e, has unbind)")
    # Journalled all the same (issue 17, point 6): remove() may still return, and then the
    # function must be bindable again, so the rollback writes its driver_override back.
    [undo] = journal.entries
    assert (undo.kind, undo.driver, undo.driver_override) == (UndoKind.REBIND, "e1000e", None)
    assert undo.abandoned_pid


def test_a_function_already_without_driver_gets_the_read_back(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, command=0x0406)])
    outcome, journal = unbind(sim)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        "driver already gone; driver left bus master on: bus master cleared",
    )
    # Bus master cleared, then driver_override `none` (issue 17, point 7: no late probe may
    # bind it and turn bus mastering back on): both undone on rollback.
    assert [u.kind for u in journal.entries] == [
        UndoKind.RESTORE_COMMAND,
        UndoKind.RESTORE_OVERRIDE,
    ]


def test_a_function_that_is_gone_is_reported_gone(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e"), SimFunction("0000:00:04.0")])
    sim.vanish(NIC)
    outcome, journal = unbind(sim)
    assert (outcome.status, outcome.detail) == (Status.GONE, "function is gone")
    assert sim.writes() == [] and journal.entries == []


def test_a_function_removed_by_its_unbind_is_done_and_rebound_on_rollback(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e"), SimFunction("0000:00:04.0")])
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(sim.kernel, journal, BusMasterClearer(sim.kernel, journal), 2)
    begun = unbinder.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    sim.vanish(NIC)  # e.g. a VF whose PF went away meanwhile
    outcome = begun.finish(result)
    assert (outcome.status, outcome.detail) == (
        Status.DONE,
        "unbound from e1000e; function removed",
    )
    assert [u.kind for u in journal.entries] == [UndoKind.REBIND]


def test_a_remove_cut_short_by_the_time_limit_says_so_and_is_still_bound(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", remove_hangs=True)])
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(
        sim.kernel, journal, BusMasterClearer(sim.kernel, journal), 30, Budget.of(0.33)
    )
    begun = unbinder.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    outcome = begun.finish(result)
    # --time-limit's deadline, not the unbind's own 30 s, rounded to a tenth of a second.
    assert (outcome.status, outcome.driver_after) == (Status.HUNG, "e1000e")
    assert outcome.detail == (
        "e1000e remove() still running when the time limit ran out (after 0.3 s; "
        f"child {result.pid} abandoned; e1000e, has unbind)"
    )
    [undo] = journal.entries
    assert undo.abandoned_pid == result.pid


def test_a_hung_remove_names_its_deadline_to_a_tenth_of_a_second(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", remove_hangs=True)])
    outcome, journal = unbind(sim, timeout_s=0.33)
    assert (outcome.status, outcome.driver_after) == (Status.HUNG, "e1000e")
    assert outcome.detail.startswith("e1000e remove() did not return within 0.3 s (child ")
    [undo] = journal.entries
    assert outcome.detail == (
        f"e1000e remove() did not return within 0.3 s (child {undo.abandoned_pid} abandoned; "
        "e1000e, has unbind)"
    )


def test_a_probe_that_binds_again_during_the_unbind_is_a_failure_though_the_write_succeeded(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(sim.kernel, journal, BusMasterClearer(sim.kernel, journal), 2)
    begun = unbinder.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    # A probe that had matched before driver_override was written finishes now.
    sim.probe_under_way(NIC, "e1000e")
    outcome = begun.finish(result)
    assert (outcome.status, outcome.detail, outcome.driver_after) == (
        Status.FAILED,
        "still bound to e1000e after unbind (write succeeded)",
        "e1000e",
    )
    assert sim.attribute(NIC, "driver_override") == "(null)"  # put back as it was
    assert journal.entries == []


def test_an_nvme_unbind_waits_for_the_longest_shutdown_the_kernel_allows(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    kernel = sim.kernel
    # Not NVMe: --unbind-timeout as given, whatever nvme_core says.
    assert unbind_deadline_s(kernel, "e1000e", 5) == 5
    # nvme_core not loaded (or its parameter unreadable): RTD3E may still reach the 60 s
    # clamp, plus remove()'s own work.
    assert unbind_deadline_s(kernel, "nvme", 5) == 62
    parameters = sim.root / "module" / "nvme_core" / "parameters"
    parameters.mkdir(parents=True)
    for parameter, expected in (("3", 62), ("60", 62), ("61", 63), ("90", 92), ("x", 62)):
        (parameters / "shutdown_timeout").write_text(parameter + "\n")
        assert unbind_deadline_s(kernel, "nvme", 5) == expected, parameter
    assert unbind_deadline_s(kernel, "e1000e", 5) == 5
    assert unbind_deadline_s(kernel, "nvme", 120) == 120  # a longer --unbind-timeout stands
    assert unbind_deadline_s(kernel, "nvme", 92.5) == 92.5


def test_the_override_a_function_had_is_journalled_for_the_rollback(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="vfio-pci")])
    (sim.device_dir(NIC) / "driver_override").write_text("vfio-pci\n")  # e.g. driverctl
    outcome, journal = unbind(sim)
    assert outcome.status is Status.DONE
    assert journal.entries[0] == Undo(
        UndoKind.REBIND, Bdf.parse(NIC), driver="vfio-pci", driver_override="vfio-pci"
    )
    assert [r.ok for r in journal.rollback(sim.kernel)] == [True, True]
    assert sim.attribute(NIC, "driver_override") == "vfio-pci"
    assert sim.driver_of(NIC) == "vfio-pci"


def test_a_hung_pf_journals_its_vfs_and_its_override_as_one_that_returned(
    make_sim: SimFactory,
) -> None:
    pf, vf = "0000:01:00.0", "0000:01:00.1"
    sim = make_sim(
        [
            SimFunction(pf, driver="ixgbe", multifunction=True, remove_hangs=True),
            SimFunction(vf, physfn=pf, driver="ixgbevf"),
        ]
    )
    (sim.device_dir(pf) / "driver_override").write_text("ixgbe\n")
    outcome, journal = unbind(sim, Step(Bdf.parse(pf), Action.UNBIND, "ixgbe"), timeout_s=0.3)
    assert outcome.status is Status.HUNG
    [sriov, rebind] = journal.entries
    assert sriov == Undo(UndoKind.RESTORE_SRIOV, Bdf.parse(pf), numvfs=1)
    assert (rebind.kind, rebind.driver, rebind.driver_override) == (
        UndoKind.REBIND,
        "ixgbe",
        "ixgbe",
    )
    assert rebind.abandoned_pid


def test_a_pf_removed_by_its_unbind_journals_its_vfs_and_override(make_sim: SimFactory) -> None:
    pf, vf = "0000:01:00.0", "0000:01:00.1"
    sim = make_sim(
        [
            SimFunction(pf, driver="ixgbe", multifunction=True),
            SimFunction(vf, physfn=pf, driver="ixgbevf"),
            SimFunction("0000:00:04.0"),
        ]
    )
    (sim.device_dir(pf) / "driver_override").write_text("ixgbe\n")
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(sim.kernel, journal, BusMasterClearer(sim.kernel, journal), 2)
    step = Step(Bdf.parse(pf), Action.UNBIND, "ixgbe, has unbind")
    begun = unbinder.begin(step)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    sim.vanish(pf)  # hot removal while remove() ran
    outcome = begun.finish(result)
    assert (outcome.step, outcome.status) == (step, Status.DONE)
    assert journal.entries == [
        Undo(UndoKind.RESTORE_SRIOV, Bdf.parse(pf), numvfs=1),
        Undo(UndoKind.REBIND, Bdf.parse(pf), driver="ixgbe", driver_override="ixgbe"),
    ]


def test_a_refused_unbind_whose_override_cannot_be_put_back_is_still_the_unbinds_failure(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    sim.fail_write(NIC, "unbind", errno.EBUSY)
    journal = Journal(undo_timeout_s=2)
    unbinder = Unbinder(sim.kernel, journal, BusMasterClearer(sim.kernel, journal), 2)
    begun = unbinder.begin(STEP)
    assert isinstance(begun, Pending)
    _child, result = wait_first([begun.child])
    sim.fail_write(NIC, "driver_override", errno.EPERM)  # the put-back is refused
    outcome = begun.finish(result)
    assert (outcome.status, outcome.detail) == (
        Status.FAILED,
        "still bound to e1000e after unbind (EBUSY)",
    )
    assert sim.attribute(NIC, "driver_override") == "none"
    assert journal.entries == []


def test_an_nvme_remove_longer_than_the_unbind_timeout_is_waited_for(
    make_sim: SimFactory,
) -> None:
    # The controller's shutdown may take up to 60 s: --unbind-timeout does not cut it short.
    sim = make_sim([SimFunction(NIC, driver="nvme", remove_seconds=0.6)])
    outcome, journal = unbind(sim, Step(Bdf.parse(NIC), Action.UNBIND, "nvme"), timeout_s=0.2)
    assert (outcome.status, sim.driver_of(NIC)) == (Status.DONE, None)
    assert journal.entries[0].kind is UndoKind.REBIND
