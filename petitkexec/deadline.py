"""Run one blocking kernel call in a forked child, and give up on it at a deadline.

A sysfs `unbind` write runs the driver's remove() synchronously and can block forever (a held
device_lock, a remove() waiting for its users). A thread stuck there would also block execve()
of the whole process, so the write happens in a child that the parent can abandon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ChildResult:
    finished: bool  # False: the deadline passed and the child was abandoned
    errno: int = 0  # 0 on success, else the OSError's errno raised in the child
    detail: str = ""
    pid: int = 0
    elapsed_s: float = 0.0


def run_with_deadline(call: Callable[[], None], timeout_s: float) -> ChildResult:
    """Run `call` in a forked child; an OSError it raises comes back as `errno`."""
    started = time.monotonic()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one line, never return into the caller's stack
        os.close(read_end)
        code, detail = 0, ""
        try:
            call()
        except OSError as error:
            code, detail = error.errno or errno.EIO, error.strerror or str(error)
        except BaseException as error:
            code, detail = errno.EIO, repr(error)
        os.write(write_end, f"{code} {detail}".encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout_s)
        if not ready:
            # The child may sit in uninterruptible sleep and never die; do not wait for it.
            os.kill(pid, signal.SIGKILL)
            _reap_if_dead(pid)
            return ChildResult(
                False,
                errno.ETIMEDOUT,
                f"no answer after {timeout_s:g} s",
                pid,
                time.monotonic() - started,
            )
        report = os.read(read_end, 4096).decode(errors="replace")
    finally:
        os.close(read_end)
    os.waitpid(pid, 0)
    code_text, _, detail = report.partition(" ")
    code = int(code_text) if code_text.isdigit() else errno.EIO
    return ChildResult(True, code, detail, pid, time.monotonic() - started)


def _reap_if_dead(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
