"""The journal of undos, rolled back on the simulated kernel: each kind of undo, what it writes,
and how a failure, a hang and a function that is gone are reported without stopping the rest."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.deadline import ChildResult, wait_first
from petitkexec.journal import Journal, Undo, UndoKind, UndoResult
from petitkexec.kernel import Kernel
from tests.conftest import SimFactory
from tests.simkernel import SimFunction, SimKernel

NIC = "0000:00:03.0"
B = Bdf.parse(NIC)


@pytest.mark.parametrize(
    ("undo", "text"),
    [
        (Undo(UndoKind.REBIND, B, driver="e1000e"), f"rebind {NIC} to e1000e"),
        (Undo(UndoKind.RESTORE_COMMAND, B, command=0x406), f"restore COMMAND 0x0406 on {NIC}"),
        (Undo(UndoKind.RESTORE_SRIOV, B, numvfs=2), f"restore 2 VFs on {NIC}"),
        (Undo(UndoKind.REENABLE, B, enable_count=3), f"enable {NIC} again (count 3)"),
        (Undo(UndoKind.RESTORE_OVERRIDE, B), f"restore driver_override (null) on {NIC}"),
        (
            Undo(UndoKind.RESTORE_OVERRIDE, B, driver_override="vfio-pci"),
            f"restore driver_override vfio-pci on {NIC}",
        ),
        (
            Undo(UndoKind.RESTORE_AUTOPROBE, B),
            f"turn sriov_drivers_autoprobe back on for {NIC}",
        ),
    ],
)
def test_each_undo_describes_itself(undo: Undo, text: str) -> None:
    assert undo.describe() == text


def test_undos_run_last_first_and_a_failure_does_not_stop_the_rest(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, command=0x0406, enable_count=0)])
    sim.fail_write(NIC, "config", errno.EIO)
    journal = Journal(undo_timeout_s=2)
    first = Undo(UndoKind.REENABLE, B, enable_count=2)
    second = Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407)
    journal.record(first)
    journal.record(second)
    results = journal.rollback(sim.kernel)
    assert [(r.undo, r.ok) for r in results] == [(second, False), (first, True)]
    assert results[0].detail == "COMMAND: EIO (Input/output error): Input/output error"
    assert results[1] == UndoResult(first, True, "")
    assert [w["data"] for w in sim.writes() if w["path"].endswith("/enable")] == ["1", "1"]
    assert sim.attribute(NIC, "enable") == "2"
    assert journal.entries == []  # spent: a second rollback does nothing
    assert journal.rollback(sim.kernel) == []


def test_a_command_is_written_back_as_it_was(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, command=0x0402)])
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407))
    assert journal.rollback(sim.kernel) == [
        UndoResult(Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407), True)
    ]
    assert sim.command_of(NIC) == 0x0407


def test_a_rebind_puts_the_override_back_and_binds_only_an_unbound_function(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e"), SimFunction("0000:00:04.0")])
    kernel = sim.kernel
    kernel.set_driver_override(B, "none")
    undo = Undo(UndoKind.REBIND, B, driver="e1000e", driver_override=None)
    journal = Journal(undo_timeout_s=2)
    journal.record(undo)
    # Still bound (an unbind that failed): only the override is put back, no bind write.
    assert journal.rollback(kernel) == [UndoResult(undo, True)]
    assert sim.attribute(NIC, "driver_override") == "(null)"
    assert not any(w["path"].endswith("/bind") for w in sim.writes())


def test_a_rebind_after_an_unbind_binds_the_driver_again(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    kernel = sim.kernel
    kernel.set_driver_override(B, "none")
    wait_first([kernel.start_unbind(B, "e1000e", 2)])
    assert sim.driver_of(NIC) is None
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e", driver_override=None))
    assert [r.ok for r in journal.rollback(kernel)] == [True]
    assert sim.driver_of(NIC) == "e1000e"
    assert sim.attribute(NIC, "driver_override") == "(null)"  # before the bind: it matches


def test_a_rebind_whose_probe_hangs_is_reported_at_its_deadline(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e", probe_hangs=True)])
    kernel = sim.kernel
    wait_first([kernel.start_unbind(B, "e1000e", 2)])
    journal = Journal(undo_timeout_s=0.5)
    undo = Undo(UndoKind.REBIND, B, driver="e1000e")
    journal.record(undo)
    assert journal.rollback(kernel) == [
        UndoResult(
            undo,
            False,
            "bind e1000e: ETIMEDOUT (Connection timed out): no answer within 0.5 s "
            "(child abandoned)",
        )
    ]


def test_a_refused_bind_is_reported_with_its_errno(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")])
    kernel = sim.kernel
    kernel.set_driver_override(B, "none")
    wait_first([kernel.start_unbind(B, "e1000e", 2)])
    sim.fail_write(NIC, "bind", errno.ENODEV)
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e"))
    (result,) = journal.rollback(kernel)
    assert not result.ok
    assert result.detail.startswith("bind e1000e: ENODEV (No such device): ")
    # The probe returned: the override goes back from e1000e to what it was.
    assert sim.attribute(NIC, "driver_override") == "(null)"


def test_an_undo_for_a_function_that_is_gone_says_so(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC)])
    sim.vanish(NIC)
    journal = Journal(undo_timeout_s=2)
    undo = Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407)
    journal.record(undo)
    (result,) = journal.rollback(sim.kernel)
    assert (result.ok, result.undo) == (False, undo)
    assert result.detail == (
        f"{sim.kernel.device_dir(B)}: ENODEV ({os.strerror(errno.ENODEV)}): device is gone"
    )
    assert sim.writes() == []


@pytest.mark.parametrize("override", [None, "vfio-pci"])
def test_an_override_is_written_back_as_it_was(make_sim: SimFactory, override: str | None) -> None:
    sim = make_sim([SimFunction(NIC)])
    sim.kernel.set_driver_override(B, "none")
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.RESTORE_OVERRIDE, B, driver_override=override))
    assert [r.ok for r in journal.rollback(sim.kernel)] == [True]
    assert sim.attribute(NIC, "driver_override") == (override or "(null)")


PF, VFS = "0000:01:00.0", ("0000:01:00.1", "0000:01:00.2")
P = Bdf.parse(PF)


def pf_unbound_with_its_vfs_gone(make_sim: SimFactory) -> tuple[SimKernel, Journal]:
    """The NVMe PF of q35_like unbound (which removed its two VFs), journalled as the unbind
    step journals it: SR-IOV first, so the rebind is undone first."""
    sim = make_sim()
    kernel = sim.kernel
    kernel.set_driver_override(P, "none")
    wait_first([kernel.start_unbind(P, "nvme", 2)])
    assert not any(sim.exists(vf) for vf in VFS)
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.RESTORE_SRIOV, P, numvfs=2))
    journal.record(Undo(UndoKind.REBIND, P, driver="nvme"))
    return sim, journal


def autoprobe_writes(sim: SimKernel) -> list[str]:
    return [w["data"] for w in sim.writes() if w["path"].endswith("/sriov_drivers_autoprobe")]


def test_vfs_come_back_with_autoprobe_off_which_is_turned_on_after_every_other_undo(
    make_sim: SimFactory,
) -> None:
    sim, journal = pf_unbound_with_its_vfs_gone(make_sim)
    command = Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407)
    journal.entries.insert(0, command)  # recorded before the PF's: undone after it
    results = journal.rollback(sim.kernel)
    assert [(r.undo.kind, r.ok) for r in results] == [
        (UndoKind.REBIND, True),
        (UndoKind.RESTORE_SRIOV, True),
        (UndoKind.RESTORE_COMMAND, True),
        (UndoKind.RESTORE_AUTOPROBE, True),  # last: the VFs' own rebinds would come before
    ]
    assert results[3].undo == Undo(UndoKind.RESTORE_AUTOPROBE, P)
    assert all(sim.exists(vf) and sim.driver_of(vf) is None for vf in VFS)  # not autoprobed
    assert autoprobe_writes(sim) == ["0", "1"]
    assert sim.attribute(PF, "sriov_drivers_autoprobe") == "1"
    assert sim.attribute(PF, "sriov_numvfs") == "2"


def test_vfs_are_autoprobed_when_autoprobe_cannot_be_turned_off(make_sim: SimFactory) -> None:
    sim, journal = pf_unbound_with_its_vfs_gone(make_sim)
    sim.fail_write(PF, "sriov_drivers_autoprobe", errno.EACCES)
    results = journal.rollback(sim.kernel)
    assert [(r.undo.kind, r.ok) for r in results] == [
        (UndoKind.REBIND, True),
        (UndoKind.RESTORE_SRIOV, True),
    ]
    assert [sim.driver_of(vf) for vf in VFS] == ["nvme", "nvme"]
    assert sim.attribute(PF, "sriov_drivers_autoprobe") == "1"


def test_a_refused_sriov_numvfs_turns_autoprobe_back_on_and_says_why(
    make_sim: SimFactory,
) -> None:
    sim, journal = pf_unbound_with_its_vfs_gone(make_sim)
    sim.fail_write(PF, "sriov_numvfs", errno.ENOMEM)
    results = journal.rollback(sim.kernel)
    assert [(r.undo.kind, r.ok) for r in results] == [
        (UndoKind.REBIND, True),
        (UndoKind.RESTORE_SRIOV, False),
    ]
    assert results[1].detail.startswith("sriov_numvfs: ENOMEM (Cannot allocate memory)")
    assert autoprobe_writes(sim) == ["0", "1"]
    assert sim.attribute(PF, "sriov_drivers_autoprobe") == "1"


def test_vfs_already_there_are_left_as_they_are(make_sim: SimFactory) -> None:
    sim = make_sim()
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.RESTORE_SRIOV, P, numvfs=2))
    assert [r.ok for r in journal.rollback(sim.kernel)] == [True]
    assert sim.writes() == []


def override_writes(sim: SimKernel, bdf: str = NIC) -> list[str]:
    return [w["data"] for w in sim.writes() if w["path"].endswith(f"{bdf}/driver_override")]


def test_an_abandoned_unbind_that_returned_gets_its_override_back_then_its_driver(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")], autoprobe=False)
    kernel = sim.kernel
    kernel.set_driver_override(B, "none")
    wait_first([kernel.start_unbind(B, "e1000e", 2)])  # remove() returned after all
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e", abandoned_pid=4242))
    assert [r.ok for r in journal.rollback(kernel)] == [True]
    assert sim.driver_of(NIC) == "e1000e"
    # First what it had (so it is bindable even if the bind then fails), then the driver's
    # name for the bind, then what it had.
    assert override_writes(sim)[1:] == ["", "e1000e", ""]
    assert sim.attribute(NIC, "driver_override") == "(null)"


def test_an_abandoned_unbind_bound_elsewhere_keeps_the_override_and_says_where(
    make_sim: SimFactory,
) -> None:
    sim = make_sim([SimFunction(NIC, driver="e1000e")], autoprobe=False)
    kernel = sim.kernel
    kernel.set_driver_override(B, "none")
    wait_first([kernel.start_unbind(B, "e1000e", 2)])
    sim.probe_under_way(NIC, "igb")  # a probe that had matched before the override
    journal = Journal(undo_timeout_s=2)
    undo = Undo(UndoKind.REBIND, B, driver="e1000e", driver_override="vfio-pci", abandoned_pid=7)
    journal.record(undo)
    assert journal.rollback(kernel) == [UndoResult(undo, False, "bound to igb, not e1000e")]
    assert override_writes(sim)[1:] == ["vfio-pci"]  # written once: no bind was tried
    assert not any(w["path"].endswith("/bind") for w in sim.writes())


def abandoned_unbind(make_sim: SimFactory) -> tuple[SimKernel, ChildResult]:
    """NIC's unbind, given up after 0.3 s while remove() still holds device_lock."""
    sim = make_sim([SimFunction(NIC, driver="e1000e", remove_hangs=True)], autoprobe=False)
    sim.kernel.set_driver_override(B, "none")
    _child, unbind = wait_first([sim.kernel.start_unbind(B, "e1000e", 0.3)])
    return sim, unbind


def test_an_abandoned_unbind_still_in_remove_is_reported_and_its_override_lands_later(
    make_sim: SimFactory,
) -> None:
    sim, unbind = abandoned_unbind(make_sim)
    kernel = sim.kernel
    assert not unbind.finished
    journal = Journal(undo_timeout_s=0.5)
    undo = Undo(UndoKind.REBIND, B, driver="e1000e", abandoned_pid=unbind.pid)
    journal.record(undo)
    assert journal.rollback(kernel) == [
        UndoResult(
            undo,
            False,
            f"remove() (child {unbind.pid}) still holds device_lock: driver_override (null) "
            "is written when it returns, leaving the function unbound but bindable",
        )
    ]
    assert sim.attribute(NIC, "driver_override") == "none"
    sim.release(NIC)  # remove() returns: the override write left waiting lands
    deadline = time.monotonic() + 10
    while sim.attribute(NIC, "driver_override") != "(null)" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.attribute(NIC, "driver_override") == "(null)"
    assert sim.driver_of(NIC) is None


def unbound_nic(make_sim: SimFactory, **kwargs: object) -> SimKernel:
    """NIC unbound by us (driver_override `none`), udev kept away."""
    sim = make_sim([SimFunction(NIC, driver="e1000e", **kwargs)], autoprobe=False)  # type: ignore[arg-type]
    sim.kernel.set_driver_override(B, "none")
    wait_first([sim.kernel.start_unbind(B, "e1000e", 2)])
    return sim


def test_a_refused_bind_puts_back_the_override_the_function_had(make_sim: SimFactory) -> None:
    sim = unbound_nic(make_sim)
    sim.fail_write(NIC, "bind", errno.ENODEV)
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e", driver_override="vfio-pci"))
    assert [r.ok for r in journal.rollback(sim.kernel)] == [False]
    assert sim.attribute(NIC, "driver_override") == "vfio-pci"


def test_a_rebind_puts_back_the_override_the_function_had(make_sim: SimFactory) -> None:
    sim = unbound_nic(make_sim)
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e", driver_override="vfio-pci"))
    assert [r.ok for r in journal.rollback(sim.kernel)] == [True]
    assert (sim.driver_of(NIC), sim.attribute(NIC, "driver_override")) == ("e1000e", "vfio-pci")


def test_a_function_bound_elsewhere_gets_its_override_back_and_the_undo_says_where(
    make_sim: SimFactory,
) -> None:
    sim = unbound_nic(make_sim)
    sim.probe_under_way(NIC, "igb")
    journal = Journal(undo_timeout_s=2)
    undo = Undo(UndoKind.REBIND, B, driver="e1000e")
    journal.record(undo)
    assert journal.rollback(sim.kernel) == [UndoResult(undo, False, "bound to igb, not e1000e")]
    assert sim.attribute(NIC, "driver_override") == "(null)"
    assert not any(w["path"].endswith("/bind") for w in sim.writes())


def test_a_bind_that_answers_success_without_binding_says_the_driver_did_not_bind(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # really_probe() on older kernels: a probe() that rejects the match (-ENODEV, -ENXIO) is
    # not passed on, and `bind` answers success with no driver bound.
    sim = unbound_nic(make_sim)
    monkeypatch.setattr(sim, "_bind", lambda _bdf, _driver: None)
    journal = Journal(undo_timeout_s=2)
    undo = Undo(UndoKind.REBIND, B, driver="e1000e")
    journal.record(undo)
    assert journal.rollback(sim.kernel) == [UndoResult(undo, False, "e1000e did not bind")]
    assert sim.attribute(NIC, "driver_override") == "(null)"


def test_a_write_past_its_deadline_is_killed_before_it_lands(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = unbound_nic(make_sim)
    write = SimKernel.write

    def slow_override(self: SimKernel, path: Path, data: bytes, offset: int | None = None) -> None:
        if path.name == "driver_override":
            time.sleep(1.0)  # the child is still on its way to write() at its deadline
        write(self, path, data, offset)

    monkeypatch.setattr(SimKernel, "write", slow_override)
    journal = Journal(undo_timeout_s=1e-6)
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e"))
    [result] = journal.rollback(sim.kernel)
    assert not result.ok and result.detail.startswith("driver_override: ETIMEDOUT")
    time.sleep(1.5)  # long enough for a child that was not killed to write
    assert sim.attribute(NIC, "driver_override") == "none"


def test_a_write_meant_to_land_later_is_not_killed_at_its_deadline(
    make_sim: SimFactory,
) -> None:
    sim, unbind = abandoned_unbind(make_sim)
    kernel = sim.kernel
    journal = Journal(undo_timeout_s=1e-6)  # abandoned before the child reaches write()
    journal.record(Undo(UndoKind.REBIND, B, driver="e1000e", abandoned_pid=unbind.pid))
    [result] = journal.rollback(kernel)
    assert not result.ok and "is written when it returns" in result.detail
    sim.release(NIC)
    deadline = time.monotonic() + 10
    while sim.attribute(NIC, "driver_override") != "(null)" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.attribute(NIC, "driver_override") == "(null)"


def test_a_child_that_dies_without_a_report_is_an_eio(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed from outside (the OOM killer, say) before it said how its write went.
    sim = make_sim([SimFunction(NIC)])
    monkeypatch.setattr(Kernel, "_write_confined", lambda *_args: os._exit(0))
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.RESTORE_COMMAND, B, command=0x0407))
    [result] = journal.rollback(sim.kernel)
    assert (result.ok, result.detail) == (False, "COMMAND: EIO (Input/output error): EIO")


def test_a_refused_enable_is_reported_as_such(make_sim: SimFactory) -> None:
    sim = make_sim([SimFunction(NIC, enable_count=0)])
    sim.fail_write(NIC, "enable", errno.EIO)
    journal = Journal(undo_timeout_s=2)
    journal.record(Undo(UndoKind.REENABLE, B, enable_count=1))
    [result] = journal.rollback(sim.kernel)
    assert (result.ok, result.detail) == (
        False,
        "enable: EIO (Input/output error): Input/output error",
    )


def test_a_refused_sriov_numvfs_is_what_is_reported_even_if_autoprobe_stays_off(
    make_sim: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, journal = pf_unbound_with_its_vfs_gone(make_sim)
    sim.fail_write(PF, "sriov_numvfs", errno.ENOMEM)
    start_set_sriov_numvfs = Kernel.start_set_sriov_numvfs

    def then_autoprobe_refused(kernel: Kernel, bdf: Bdf, numvfs: int, timeout_s: float):  # type: ignore[no-untyped-def]
        sim.fail_write(PF, "sriov_drivers_autoprobe", errno.EACCES)
        return start_set_sriov_numvfs(kernel, bdf, numvfs, timeout_s)

    monkeypatch.setattr(Kernel, "start_set_sriov_numvfs", then_autoprobe_refused)
    results = journal.rollback(sim.kernel)
    assert [(r.undo.kind, r.ok) for r in results] == [
        (UndoKind.REBIND, True),
        (UndoKind.RESTORE_SRIOV, False),
    ]
    assert results[1].detail.startswith("sriov_numvfs: ENOMEM (Cannot allocate memory)")
    assert sim.attribute(PF, "sriov_drivers_autoprobe") == "0"  # what is there, as it is
