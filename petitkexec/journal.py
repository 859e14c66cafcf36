"""Every mutation, with how to undo it, so a failed handoff can put the machine back."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.errors import KernelWriteFailed
from petitkexec.kernel import Kernel


class UndoKind(Enum):
    REBIND = "rebind"  # restore driver_override, then bind the original driver again
    RESTORE_COMMAND = "restore-command"  # write PCI_COMMAND back as it was
    REENABLE = "re-enable"  # `enable` ← 1, where bus master was cleared through `enable`


@dataclass(frozen=True)
class Undo:
    kind: UndoKind
    bdf: Bdf
    driver: str | None = None
    driver_override: str | None = None
    command: int | None = None

    def describe(self) -> str:
        if self.kind is UndoKind.REBIND:
            return f"rebind {self.bdf} to {self.driver}"
        if self.kind is UndoKind.RESTORE_COMMAND:
            return f"restore COMMAND {self.command:#06x} on {self.bdf}"
        return f"enable {self.bdf} again"


@dataclass(frozen=True)
class UndoResult:
    undo: Undo
    ok: bool
    detail: str = ""


@dataclass
class Journal:
    entries: list[Undo] = field(default_factory=list)

    def record(self, undo: Undo) -> None:
        self.entries.append(undo)

    def rollback(self, kernel: Kernel) -> list[UndoResult]:
        """Undo in reverse order, best effort: one failure does not stop the others."""
        results = []
        while self.entries:
            undo = self.entries.pop()
            try:
                _apply(kernel, undo)
            except KernelWriteFailed as error:
                results.append(UndoResult(undo, False, str(error)))
            else:
                results.append(UndoResult(undo, True))
        return results


def _apply(kernel: Kernel, undo: Undo) -> None:
    if not kernel.exists(undo.bdf):
        raise KernelWriteFailed(str(kernel.device_dir(undo.bdf)), errno.ENODEV, "device is gone")
    if undo.kind is UndoKind.REBIND:
        assert undo.driver is not None
        kernel.set_driver_override(undo.bdf, undo.driver_override)
        if kernel.driver(undo.bdf) is None:
            kernel.bind(undo.bdf, undo.driver)
    elif undo.kind is UndoKind.RESTORE_COMMAND:
        assert undo.command is not None
        kernel.write_command(undo.bdf, undo.command)
    else:
        kernel.write_enable(undo.bdf, True)
