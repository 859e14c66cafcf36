"""Load a kernel with kexec, and hand the machine over to it.

kexec is run as a child and waited for rather than exec'd: when the handoff works the machine
never comes back to us, and when kexec refuses we are still here to roll the teardown back.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# include/uapi/linux/reboot.h
LINUX_REBOOT_CMD_KEXEC = 0x45584543
# The next kernel resets every PHB at boot (arch/powerpc/platforms/powernv/pci-ioda.c): the
# field fix for xHCI controllers that do not halt across a kexec on POWER (op-build #307).
RESET_PHBS_PARAMETER = "ppc_pci_reset_phbs"
# Searched after PATH: where distributions and bootloader images put kexec.
KEXEC_SEARCH_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin")


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class LoadRequest:
    """--load: the kernel to `kexec -l` (or -s) before the teardown."""

    kernel: Path
    initrd: Path | None = None
    append: str | None = None
    reuse_cmdline: bool = False
    dtb: Path | None = None
    file_load: bool = False  # kexec_file_load (-s): the only loader integrity lockdown allows
    # --next-kernel-reset-phbs: the running kernel's command line (for --reuse-cmdline) is
    # read here, so that the parameter can be added to it.
    reset_phbs: bool = False
    running_cmdline: str = ""

    def command(self, kexec: str) -> list[str]:
        argv = [kexec, "-l", str(self.kernel)]
        if self.file_load:
            argv.append("-s")
        if self.initrd is not None:
            argv.append(f"--initrd={self.initrd}")
        if self.reset_phbs:
            base = self.running_cmdline if self.reuse_cmdline else (self.append or "")
            argv.append(f"--append={' '.join([*base.split(), RESET_PHBS_PARAMETER])}")
        elif self.reuse_cmdline:
            argv.append("--reuse-cmdline")
        elif self.append is not None:
            argv.append(f"--append={self.append}")
        if self.dtb is not None:
            argv.append(f"--dtb={self.dtb}")
        return argv


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class HandoffResult:
    """Only ever seen when the handoff did not happen."""

    command: tuple[str, ...]
    returncode: int
    output: str


def find_kexec(explicit: str | None = None, path: str | None = None) -> str | None:
    """The absolute path of kexec-tools or kexec-lite (petitboot ships the latter as `kexec`).

    Only absolute directories are searched: an empty or relative PATH entry (`env -i`, a
    stray `:`) means the working directory, where anyone may have put a `kexec`, and a
    relative answer would be resolved again, differently, when it is run.
    """
    if explicit is not None:
        candidate = os.path.abspath(explicit)
        return candidate if _executable_file(candidate) else None
    directories = [*(path or os.environ.get("PATH", "")).split(":"), *KEXEC_SEARCH_PATH]
    for directory in directories:
        if os.path.isabs(directory):
            candidate = os.path.join(directory, "kexec")
            if _executable_file(candidate):
                return candidate
    return None


def _executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def load(request: LoadRequest, kexec: str) -> HandoffResult | None:
    """Run `kexec -l ...`; None on success, else what kexec said."""
    failure = _run(request.command(kexec))
    return None if failure.returncode == 0 else failure


def exec_argv(kexec: str, extra_args: tuple[str, ...] = ()) -> list[str]:
    """`kexec ARGS -e`. The caller's arguments come first because kexec-tools reads its
    options in order: `-f` (load and execute) after `-e` turns the call back into a load,
    which fails without a kernel file ("No kernel specified"). kexec-lite takes them in any
    order, and needs `-f`: without it, `-e` runs `shutdown -r now`."""
    return [kexec, *extra_args, "-e"]


def execute_loaded_kernel(
    kexec: str | None,
    extra_args: tuple[str, ...] = (),
    go_on: Callable[[], bool] = lambda: True,
) -> HandoffResult:
    """sync(), then `kexec ARGS -e` (or the reboot syscall). Returns only if the handoff
    failed, or was not attempted: `go_on` is asked once the sync, which may take seconds with
    dirty data, is done (a stop signal came meanwhile)."""
    os.sync()
    if not go_on():
        what = ("reboot(LINUX_REBOOT_CMD_KEXEC)",) if kexec is None else (kexec, "-e")
        return HandoffResult(what, NOT_ATTEMPTED, "not run: a stop signal came during the sync")
    if kexec is None:
        return _reboot_syscall()
    return _run(exec_argv(kexec, extra_args))


# What a shell answers for a command killed by SIGINT: the handoff stopped before it began.
NOT_ATTEMPTED = 130


# What a shell answers for a command it cannot execute.
CANNOT_EXECUTE = 126


def _run(argv: list[str]) -> HandoffResult:
    """The one way petitkexec runs a program: no shell, and a program that cannot be run is
    an answer like any other, never an exception."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as error:
        return HandoffResult(tuple(argv), CANNOT_EXECUTE, f"cannot run {argv[0]}: {error}")
    return HandoffResult(tuple(argv), done.returncode, first_line(done.stderr, done.stdout))


def first_line(*texts: str) -> str:
    """What a program said, on one line: the first non-empty line of the first text that has
    one. kexec-tools follows an error on stderr with its usage text, and a wrapper may print
    pages: the report stays one line per failure."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def _reboot_syscall() -> HandoffResult:
    # The interpreter's own symbols include libc's reboot(); no library lookup, which would
    # need ldconfig (ctypes.util.find_library), and the same on glibc and musl.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
    code = ctypes.get_errno()
    return HandoffResult(("reboot(LINUX_REBOOT_CMD_KEXEC)",), code, os.strerror(code))
