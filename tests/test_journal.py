"""The journal of undos, rolled back on the simulated kernel: each kind of undo, what it writes,
and how a failure, a hang and a function that is gone are reported without stopping the rest."""

from __future__ import annotations

import errno
import os

import pytest

from petitkexec.bdf import Bdf
from petitkexec.deadline import wait_first
from petitkexec.journal import Journal, Undo, UndoKind, UndoResult
from tests.conftest import SimFactory
from tests.simkernel import SimFunction

NIC = "0000:00:03.0"
B = Bdf.parse(NIC)


@pytest.mark.parametrize(
    ("undo", "text"),
    [
        (Undo(UndoKind.REBIND, B, driver="e1000e"), f"rebind {NIC} to e1000e"),
        (Undo(UndoKind.RESTORE_COMMAND, B, command=0x406), f"restore COMMAND 0x0406 on {NIC}"),
        (Undo(UndoKind.RESTORE_SRIOV, B, numvfs=2), f"restore 2 VFs on {NIC}"),
        (Undo(UndoKind.REENABLE, B, enable_count=3), f"enable {NIC} again (count 3)"),
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
