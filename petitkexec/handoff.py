"""Load a kernel with kexec, and hand the machine over to it.

kexec is run as a child and waited for rather than exec'd: when the handoff works the machine
never comes back to us, and when kexec refuses we are still here to roll the teardown back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# include/uapi/linux/reboot.h
LINUX_REBOOT_CMD_KEXEC = 0x45584543
KEXEC_SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin:/usr/local/sbin"


@dataclass(frozen=True)
class LoadRequest:
    kernel: Path
    initrd: Path | None = None
    append: str | None = None
    reuse_cmdline: bool = False
    dtb: Path | None = None
    file_load: bool = False  # kexec_file_load (-s): the only loader integrity lockdown allows

    def command(self, kexec: str) -> list[str]:
        argv = [kexec, "-l", str(self.kernel)]
        if self.file_load:
            argv.append("-s")
        if self.initrd is not None:
            argv.append(f"--initrd={self.initrd}")
        if self.reuse_cmdline:
            argv.append("--reuse-cmdline")
        elif self.append is not None:
            argv.append(f"--append={self.append}")
        if self.dtb is not None:
            argv.append(f"--dtb={self.dtb}")
        return argv


@dataclass(frozen=True)
class HandoffResult:
    """Only ever seen when the handoff did not happen."""

    command: tuple[str, ...]
    returncode: int
    output: str


def find_kexec(explicit: str | None = None) -> str | None:
    """kexec-tools or kexec-lite (petitboot ships the latter as `kexec`)."""
    if explicit is not None:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("kexec", path=os.environ.get("PATH", "") + ":" + KEXEC_SEARCH_PATH)


def load(request: LoadRequest, kexec: str) -> HandoffResult | None:
    """Run `kexec -l ...`; None on success, else what kexec said."""
    argv = request.command(kexec)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    return HandoffResult(tuple(argv), done.returncode, (done.stderr or done.stdout).strip())


def execute_loaded_kernel(kexec: str | None, extra_args: tuple[str, ...] = ()) -> HandoffResult:
    """sync(), then `kexec -e` (or the reboot syscall). Returns only if the handoff failed."""
    os.sync()
    if kexec is None:
        return _reboot_syscall()
    argv = (kexec, "-e", *extra_args)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return HandoffResult(argv, done.returncode, (done.stderr or done.stdout).strip())


def _reboot_syscall() -> HandoffResult:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC))
    code = ctypes.get_errno()
    return HandoffResult(("reboot(LINUX_REBOOT_CMD_KEXEC)",), code, os.strerror(code))
