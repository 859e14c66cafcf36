"""Every mutation, with how to undo it, so a failed handoff can put the machine back."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.deadline import Child, wait_first
from petitkexec.errors import KernelWriteFailed, errno_name
from petitkexec.kernel import Kernel


class UndoKind(Enum):
    REBIND = "rebind"  # restore driver_override, then bind the original driver again
    RESTORE_COMMAND = "restore-command"  # write PCI_COMMAND back as it was
    REENABLE = "re-enable"  # `enable` ← 1 as many times as the count was
    RESTORE_SRIOV = "restore-sriov"  # `sriov_numvfs` ← the count unbinding the PF removed
    RESTORE_OVERRIDE = "restore-override"  # driver_override put back on an unbound function
    RESTORE_AUTOPROBE = "restore-autoprobe"  # `sriov_drivers_autoprobe` ← 1, after the VFs


@dataclass(frozen=True)
class Undo:
    """How to put back what one teardown step changed."""

    kind: UndoKind
    bdf: Bdf
    driver: str | None = None
    driver_override: str | None = None
    command: int | None = None
    enable_count: int = 0
    numvfs: int = 0
    # The child whose `unbind` write was abandoned at its deadline and may still be in
    # remove(): 0 when the unbind returned.
    abandoned_pid: int = 0

    def describe(self) -> str:
        if self.kind is UndoKind.REBIND:
            return f"rebind {self.bdf} to {self.driver}"
        if self.kind is UndoKind.RESTORE_OVERRIDE:
            return f"restore driver_override {self.driver_override or '(null)'} on {self.bdf}"
        if self.kind is UndoKind.RESTORE_AUTOPROBE:
            return f"turn sriov_drivers_autoprobe back on for {self.bdf}"
        if self.kind is UndoKind.RESTORE_COMMAND:
            return f"restore COMMAND {self.command:#06x} on {self.bdf}"
        if self.kind is UndoKind.RESTORE_SRIOV:
            return f"restore {self.numvfs} VFs on {self.bdf}"
        return f"enable {self.bdf} again (count {self.enable_count})"


@dataclass(frozen=True)
class UndoResult:
    """What became of one undo during a rollback."""

    undo: Undo
    ok: bool
    detail: str = ""


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(eq=False)
class Journal:
    """The undos of the steps done so far, rolled back last first."""

    # A rebind runs probe(), which may wait on locks a hung remove() still holds, and
    # restoring SR-IOV probes every VF; driver_override, `enable` and config writes wait on
    # the locks a stuck reset holds: each write gets this deadline, so a rollback always ends.
    undo_timeout_s: float
    entries: list[Undo] = field(default_factory=list)

    def record(self, undo: Undo) -> None:
        self.entries.append(undo)

    def rollback(self, kernel: Kernel) -> list[UndoResult]:
        """Undo in reverse order, best effort: one failure does not stop the others. What an
        undo leaves to do once the others are done (autoprobe turned back on after the VFs
        are bound) comes last."""
        results: list[UndoResult] = []
        afterwards: list[Undo] = []
        while self.entries or afterwards:
            undo = self.entries.pop() if self.entries else afterwards.pop()
            try:
                then = _apply(kernel, undo, self.undo_timeout_s)
            except (KernelWriteFailed, UndoFailed) as error:
                results.append(UndoResult(undo, False, str(error)))
            else:
                results.append(UndoResult(undo, True))
                if then is not None:
                    afterwards.append(then)
        return results


class UndoFailed(Exception):
    """An undo that ran but did not leave the function as it was; says what is there."""


def _apply(kernel: Kernel, undo: Undo, timeout_s: float) -> Undo | None:
    """Put one change back; returns an undo to run once all the others are done, if any."""
    if not kernel.exists(undo.bdf):
        raise KernelWriteFailed(str(kernel.device_dir(undo.bdf)), errno.ENODEV, "device is gone")
    if undo.kind is UndoKind.REBIND:
        _rebind(kernel, undo, timeout_s)
    elif undo.kind is UndoKind.RESTORE_COMMAND:
        command = undo.command
        assert command is not None
        _wait("COMMAND", lambda: kernel.start_write_command(undo.bdf, command, timeout_s))
    elif undo.kind is UndoKind.RESTORE_OVERRIDE:
        _set_override(kernel, undo.bdf, undo.driver_override, timeout_s)
    elif undo.kind is UndoKind.RESTORE_SRIOV:
        return _restore_sriov(kernel, undo, timeout_s)
    elif undo.kind is UndoKind.RESTORE_AUTOPROBE:
        kernel.write_sriov_drivers_autoprobe(undo.bdf, True)
    else:
        for _ in range(undo.enable_count):
            _wait("enable", lambda: kernel.start_enable(undo.bdf, timeout_s))
    return None


def _rebind(kernel: Kernel, undo: Undo, timeout_s: float) -> None:
    """Bind the journalled driver through driver_override, then put the override back.

    The override makes pci_match_device() pick exactly that driver (vfio-pci has no ID table
    to match), and lets a VF probe while its PF's sriov_drivers_autoprobe is 0
    (pci_device_can_probe()). Success is the driver read back, not the write's answer: a
    function may already sit on another driver (recreated VFs are autoprobed)."""
    bdf, driver = undo.bdf, undo.driver
    assert driver is not None
    if undo.abandoned_pid:
        # The abandoned remove() may still hold device_lock: if it has not returned by the
        # deadline, this override lands when it does, leaving the function unbound but
        # bindable.
        value = undo.driver_override
        _set_override(
            kernel,
            bdf,
            value,
            timeout_s,
            stuck=f"remove() (child {undo.abandoned_pid}) still holds device_lock: "
            f"driver_override {value or '(null)'} is written when it returns, "
            "leaving the function unbound but bindable",
        )
    if kernel.driver(bdf) is None:
        _set_override(kernel, bdf, driver, timeout_s)
        try:
            _wait(f"bind {driver}", lambda: kernel.start_bind(bdf, driver, timeout_s))
        except KernelWriteFailed as error:
            # A probe() that did not return holds device_lock: the override stays on the
            # journalled driver rather than one more child waiting with it.
            if error.errno != errno.ETIMEDOUT:
                _set_override(kernel, bdf, undo.driver_override, timeout_s)
            raise
    if not undo.abandoned_pid or kernel.driver(bdf) == driver:
        _set_override(kernel, bdf, undo.driver_override, timeout_s)
    now = kernel.driver(bdf)
    if now != driver:
        raise UndoFailed(f"bound to {now}, not {driver}" if now else f"{driver} did not bind")


def _set_override(
    kernel: Kernel, bdf: Bdf, value: str | None, timeout_s: float, stuck: str = ""
) -> None:
    """driver_set_override() takes device_lock, which a remove(), probe() or reset that did
    not return may still hold: the write waits in a child, never in this process."""
    _wait(
        "driver_override",
        lambda: kernel.start_set_driver_override(bdf, value, timeout_s),
        stuck=stuck,
    )


def _restore_sriov(kernel: Kernel, undo: Undo, timeout_s: float) -> Undo | None:
    """sriov_numvfs_store() adds the VFs (pci_iov_add_virtfn()) and, with the PF's
    sriov_drivers_autoprobe on, probes whatever driver matches them first: not necessarily
    the one each VF had. Autoprobe stays off until the VFs' own rebinds have run."""
    bdf = undo.bdf
    if kernel.read_sriov_numvfs(bdf) == undo.numvfs:
        return None
    turned_off = False
    if kernel.read_sriov_drivers_autoprobe(bdf) is True:
        # Best effort: refused, the VFs are autoprobed and their rebinds say where they are.
        with contextlib.suppress(KernelWriteFailed):
            kernel.write_sriov_drivers_autoprobe(bdf, False)
            turned_off = True
    try:
        _wait(
            "sriov_numvfs",
            lambda: kernel.start_set_sriov_numvfs(bdf, undo.numvfs, timeout_s),
        )
    except KernelWriteFailed:
        if turned_off:
            with contextlib.suppress(KernelWriteFailed):  # the numvfs error is the one to say
                kernel.write_sriov_drivers_autoprobe(bdf, True)
        raise
    return Undo(UndoKind.RESTORE_AUTOPROBE, bdf) if turned_off else None


def _wait(what: str, start: Callable[[], Child], stuck: str = "") -> None:
    """Run one blocking write in a child and wait for it, up to its deadline. With `stuck`
    (what a missed deadline means) the child is left to finish its write when it can: a
    SIGKILL before it entered write() would stop a write that is meant to land later."""
    child = start()
    _child, result = wait_first([child], kill_abandoned=not stuck)
    if not result.finished:
        if stuck:
            raise UndoFailed(stuck)
        raise KernelWriteFailed(
            what, errno.ETIMEDOUT, f"no answer within {child.timeout_s:g} s (child abandoned)"
        )
    if result.errno:
        raise KernelWriteFailed(what, result.errno, result.detail or errno_name(result.errno))
