"""Run blocking kernel calls in forked children, and give up on them at a deadline.

A sysfs `unbind` write runs the driver's remove() synchronously and can block forever (a held
device_lock, a remove() waiting for its users). A thread stuck there would also block execve()
of the whole process, so each write happens in a child that the parent can abandon. Children
run side by side when the caller starts several: independent devices' remove() calls do not
share a lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NoReturn

from petitkexec.signals import ignore_in_child


@dataclass(frozen=True)
class ChildResult:
    finished: bool  # False: the deadline passed and the child was abandoned
    errno: int = 0  # 0 on success, else the OSError's errno raised in the child
    detail: str = ""
    pid: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Child:
    pid: int
    read_end: int  # the child writes one line "ERRNO DETAIL" here when its call returns
    started: float
    timeout_s: float

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s


@dataclass(frozen=True)
class Budget:
    """An overall time limit (--time-limit): each child's deadline is clipped to what is left,
    so the deadlines of a whole run add up to less than the limit by construction."""

    ends: float | None = None  # time.monotonic(); None: no limit

    @classmethod
    def of(cls, seconds: float | None) -> Budget:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def clip(self, timeout_s: float) -> float:
        if self.ends is None:
            return timeout_s
        return max(0.0, min(timeout_s, self.ends - time.monotonic()))

    @property
    def exhausted(self) -> bool:
        return self.ends is not None and time.monotonic() >= self.ends


def start_child(call: Callable[[], None], timeout_s: float) -> Child:
    """Fork, run `call` in the child; an OSError it raises comes back as the result's errno."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _run_child(call, read_end, write_end)
    os.close(write_end)
    return Child(pid, read_end, started, timeout_s)


def _run_child(call: Callable[[], None], read_end: int, write_end: int) -> NoReturn:
    """The child's whole life: it reports one line and ends with os._exit whatever happens.
    An exception that left this function (EPIPE on the report when the parent is gone, a
    signal) would unwind into the child's copy of the parent's stack and run the parent's
    rollback and error path a second time, from a process that owns none of it."""
    try:
        ignore_in_child()
        os.close(read_end)
        code, detail = 0, ""
        try:
            call()
        except OSError as error:
            code, detail = error.errno or errno.EIO, error.strerror or str(error)
        except BaseException as error:
            code, detail = errno.EIO, repr(error)
        os.write(write_end, f"{code} {detail}".encode())
    finally:
        os._exit(0)


def wait_first(
    children: Collection[Child], kill_abandoned: bool = True
) -> tuple[Child, ChildResult]:
    """The first child to answer, or the first to pass its deadline (then abandoned: killed,
    unless `kill_abandoned` is False for a write that should still land when it can)."""
    by_fd = {child.read_end: child for child in children}
    while True:
        soonest = min(children, key=lambda child: child.deadline)
        remaining = soonest.deadline - time.monotonic()
        if remaining <= 0:
            return soonest, _abandon(soonest, kill_abandoned)
        ready, _, _ = select.select(list(by_fd), [], [], remaining)
        if ready:
            child = by_fd[ready[0]]
            return child, _collect(child)


def _collect(child: Child) -> ChildResult:
    report = os.read(child.read_end, 4096).decode(errors="replace")
    os.close(child.read_end)
    os.waitpid(child.pid, 0)
    code_text, _, detail = report.partition(" ")
    code = int(code_text) if code_text.isdigit() else errno.EIO
    return ChildResult(True, code, detail, child.pid, time.monotonic() - child.started)


def _abandon(child: Child, kill: bool) -> ChildResult:
    # The child may sit in uninterruptible sleep and never die; do not wait for it.
    if kill:
        os.kill(child.pid, signal.SIGKILL)
    os.close(child.read_end)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)
    return ChildResult(
        False,
        errno.ETIMEDOUT,
        f"no answer after {child.timeout_s:g} s",
        child.pid,
        time.monotonic() - child.started,
    )
