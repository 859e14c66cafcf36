"""The exceptions petitkexec raises, each with the fields a person needs to act on it."""

from __future__ import annotations

import errno as errno_module
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Process exit codes; documented in `petitkexec --help` and the README."""

    OK = 0
    TEARDOWN_PARTIAL = 1  # some steps failed; rolled back where possible
    USAGE = 2  # bad option, spec or config file
    PREFLIGHT_REFUSED = 3  # nothing was touched
    HANDOFF_FAILED = 4  # teardown done, kexec did not take over; rolled back
    HUNG = 5  # an unbind or a reset never returned: handing off would hang the machine
    NOT_BACK = 6  # verify: a function is missing, unbound or bound to another driver
    INTERNAL = 70  # an error petitkexec did not expect (EX_SOFTWARE); rolled back if needed
    INTERRUPTED = 130  # a stop signal (petitkexec.signals) during the run; rolled back


class PetitkexecError(Exception):
    """Base class: `str()` is one line a person can act on; `hint` is an optional second one."""

    exit_code = ExitCode.TEARDOWN_PARTIAL
    hint: str | None = None


class UsageError(PetitkexecError):
    """A bad option value, policy spec or config file: names the option and the value."""

    exit_code = ExitCode.USAGE

    def __init__(self, option: str, value: object, problem: str) -> None:
        super().__init__(f"{option}: {value!r} {problem}")
        self.option = option
        self.value = value


class PreflightRefused(PetitkexecError):
    """A precondition for a safe handoff is missing; nothing has been changed."""

    exit_code = ExitCode.PREFLIGHT_REFUSED

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


class SnapshotError(PetitkexecError):
    exit_code = ExitCode.USAGE

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class RolledBack(PetitkexecError):
    """An exception after the teardown began; the journal was rolled back before this
    (unless --no-rollback: then `left_as_is` changes were not)."""

    def __init__(
        self, cause: BaseException, rollback: tuple[Any, ...], left_as_is: int = 0
    ) -> None:
        failed = sum(1 for result in rollback if not result.ok)
        done = (
            f"not rolled back (--no-rollback): {left_as_is} changes left as they are"
            if left_as_is
            else f"rolled back {len(rollback)} changes" + (f" ({failed} failed)" if failed else "")
        )
        super().__init__(f"{describe_exception(cause)}; {done}")
        self.cause = cause
        self.rollback = rollback  # petitkexec.journal.UndoResult, one per undone change
        if isinstance(cause, PetitkexecError):
            self.exit_code, self.hint = cause.exit_code, cause.hint
        elif isinstance(cause, KeyboardInterrupt):
            self.exit_code = ExitCode.INTERRUPTED
        else:
            self.exit_code = ExitCode.INTERNAL
            self.hint = INTERNAL_HINT


INTERNAL_HINT = "this is a bug in petitkexec: run with --debug for a traceback and report it"


def describe_exception(error: BaseException) -> str:
    """One line: our errors as they read, anything else with its type."""
    if isinstance(error, PetitkexecError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(error).split())
    return f"unexpected {type(error).__name__}" + (f": {text}" if text else "")


def errno_name(code: int) -> str:
    """`EBUSY` for 16: the name a kernel developer searches for."""
    return errno_module.errorcode.get(code, str(code))


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class KernelWriteFailed(Exception):
    """A sysfs write the kernel refused (or that did not finish in time)."""

    path: str
    errno: int
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.path}: {errno_name(self.errno)} ({os.strerror(self.errno)})"
        return f"{text}: {self.detail}" if self.detail else text
