"""The exceptions petitkexec raises, each with the fields a person needs to act on it."""

from __future__ import annotations

import errno as errno_module
import os
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in `petitkexec --help` and the README."""

    OK = 0
    TEARDOWN_PARTIAL = 1  # some steps failed; rolled back where possible
    USAGE = 2  # bad option, spec or config file
    PREFLIGHT_REFUSED = 3  # nothing was touched
    HANDOFF_FAILED = 4  # teardown done, kexec did not take over; rolled back
    UNBIND_HUNG = 5  # a remove() never returned: handing off would hang the machine
    INTERRUPTED = 130  # SIGINT/SIGTERM during teardown; rolled back


class PetitkexecError(Exception):
    """Base class: `str()` is one line a person can act on; `hint` is an optional second one."""

    exit_code = ExitCode.TEARDOWN_PARTIAL
    hint: str | None = None


class UsageError(PetitkexecError):
    """A bad option value, policy spec or config file: names the option and the value."""

    exit_code = ExitCode.USAGE

    def __init__(self, option: str, value: str, problem: str) -> None:
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


@dataclass(frozen=True)
class KernelWriteFailed(Exception):
    """A sysfs write the kernel refused (or that did not finish in time)."""

    path: str
    errno: int
    detail: str = ""

    def __str__(self) -> str:
        name = errno_module.errorcode.get(self.errno, str(self.errno))
        text = f"{self.path}: {name} ({os.strerror(self.errno)})"
        return f"{text}: {self.detail}" if self.detail else text
