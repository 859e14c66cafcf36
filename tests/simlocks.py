"""The simulated kernel's device_lock, and why a stuck sysfs write outlives SIGKILL.

In the kernel a sysfs write that blocks sleeps uninterruptibly: device_lock() is mutex_lock(),
not mutex_lock_interruptible(), and a driver's remove() waits as it likes. SIGKILL stays
pending until the write returns to userspace, and by then the write has done all it does (the
device is unbound, its driver_override applied). A write holds the device's lock while it runs,
so later writes to that device's attributes that take device_lock (unbind, bind,
driver_override, enable, reset, sriov_numvfs, remove) wait for it.

The simulated kernel's writes run in the test's own process or in petitkexec's forked children,
so this state lives in files under the sim's state directory: one flock per device for
device_lock, one marker per process inside a write. `kill` stands in for os.kill while a test
runs (tests/conftest.py installs it): a SIGKILL to a process inside a simulated write is held
until that write returns.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

# The state directory of every SimKernel made during the current test.
STATE_DIRS: list[Path] = []
# A write made by the test's own process that waits this long on a device_lock would hang
# petitkexec forever on a real kernel: the sim fails the test instead of hanging it.
MAIN_PROCESS_LOCK_WAIT_S = 20.0
_POLL_S = 0.01
_real_kill = os.kill


def kill(pid: int, signum: int) -> None:
    """os.kill as a task in uninterruptible sleep sees it: SIGKILL waits for the write."""
    if signum == signal.SIGKILL:
        for state in STATE_DIRS:
            if (state / f"in-write-{pid}").exists():
                (state / f"killed-{pid}").touch()
                if (state / f"in-write-{pid}").exists():
                    return  # `uninterruptible` sees it on the way out
    _real_kill(pid, signum)


@contextmanager
def uninterruptible(state: Path) -> Iterator[None]:
    """One sysfs write: a SIGKILL sent meanwhile is delivered when it returns."""
    pid = os.getpid()
    marker = state / f"in-write-{pid}"
    marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)
        if (state / f"killed-{pid}").exists():
            _real_kill(pid, signal.SIGKILL)  # the pending signal, on the way back to userspace


@contextmanager
def device_lock(state: Path, bdf: str, main_pid: int) -> Iterator[None]:
    """device_lock() (or, for `cfg-<bdf>`, pci_cfg_access_lock()): waits as long as the
    holder holds it."""
    with (state / f"lock-{bdf}").open("a") as handle:
        if os.getpid() != main_pid:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            _lock_or_fail(handle, bdf)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock_or_fail(handle: IO[str], bdf: str) -> None:
    give_up = time.monotonic() + MAIN_PROCESS_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > give_up:
                raise AssertionError(
                    f"the test's own process waited {MAIN_PROCESS_LOCK_WAIT_S:g} s for the "
                    f"device_lock of {bdf}: on a real kernel petitkexec would hang here"
                ) from None
            time.sleep(_POLL_S)


@contextmanager
def try_device_locks(state: Path, bdfs: list[str]) -> Iterator[bool]:
    """pci_bus_trylock(): every lock at once, or none (then False)."""
    with ExitStack() as stack:
        for bdf in bdfs:
            handle = stack.enter_context((state / f"lock-{bdf}").open("a"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        yield True


def is_locked(state: Path, bdf: str) -> bool:
    with (state / f"lock-{bdf}").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def block(state: Path, bdf: str, seconds: float) -> None:
    """A driver call that takes `seconds`, or less if the test releases `bdf` (or everything)."""
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        if (state / f"release-{bdf}").exists() or (state / "release-all").exists():
            return
        time.sleep(min(_POLL_S * 2, max(0.0, ends - time.monotonic())))


def release(state: Path, bdf: str) -> None:
    (state / f"release-{bdf}").touch()


def release_everything() -> None:
    """At the end of a test: every hung remove() returns, so its child exits."""
    for state in STATE_DIRS:
        if state.exists():
            (state / "release-all").touch()
    STATE_DIRS.clear()
