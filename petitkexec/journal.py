"""Every mutation, with how to undo it, so a failed handoff can put the machine back."""

from __future__ import annotations

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

    def describe(self) -> str:
        if self.kind is UndoKind.REBIND:
            return f"rebind {self.bdf} to {self.driver}"
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
        """Undo in reverse order, best effort: one failure does not stop the others."""
        results = []
        while self.entries:
            undo = self.entries.pop()
            try:
                _apply(kernel, undo, self.undo_timeout_s)
            except KernelWriteFailed as error:
                results.append(UndoResult(undo, False, str(error)))
            else:
                results.append(UndoResult(undo, True))
        return results


def _apply(kernel: Kernel, undo: Undo, timeout_s: float) -> None:
    if not kernel.exists(undo.bdf):
        raise KernelWriteFailed(str(kernel.device_dir(undo.bdf)), errno.ENODEV, "device is gone")
    if undo.kind is UndoKind.REBIND:
        assert undo.driver is not None
        driver, override = undo.driver, undo.driver_override
        _wait(
            kernel,
            "driver_override",
            lambda: kernel.start_set_driver_override(undo.bdf, override, timeout_s),
        )
        if kernel.driver(undo.bdf) is None:
            _wait(kernel, f"bind {driver}", lambda: kernel.start_bind(undo.bdf, driver, timeout_s))
    elif undo.kind is UndoKind.RESTORE_COMMAND:
        command = undo.command
        assert command is not None
        _wait(kernel, "COMMAND", lambda: kernel.start_write_command(undo.bdf, command, timeout_s))
    elif undo.kind is UndoKind.RESTORE_SRIOV:
        if kernel.read_sriov_numvfs(undo.bdf) != undo.numvfs:
            _wait(
                kernel,
                "sriov_numvfs",
                lambda: kernel.start_set_sriov_numvfs(undo.bdf, undo.numvfs, timeout_s),
            )
    else:
        for _ in range(undo.enable_count):
            _wait(kernel, "enable", lambda: kernel.start_enable(undo.bdf, timeout_s))


def _wait(kernel: Kernel, what: str, start: Callable[[], Child]) -> None:
    """Run one blocking write in a child and wait for it, up to its deadline."""
    child = start()
    _child, result = wait_first([child])
    if not result.finished:
        raise KernelWriteFailed(
            what, errno.ETIMEDOUT, f"no answer within {child.timeout_s:g} s (child abandoned)"
        )
    if result.errno:
        raise KernelWriteFailed(what, result.errno, result.detail or errno_name(result.errno))
