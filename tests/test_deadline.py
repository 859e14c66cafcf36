"""Blocking calls in forked children with a deadline (petitkexec.deadline), on real children:
what comes back when the call returns, raises, or never answers, and the overall budget."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from typing import NoReturn

import pytest

from petitkexec import deadline
from petitkexec.deadline import Budget, Child, ChildResult, _collect, start_child, wait_first


def never_returns() -> None:
    time.sleep(60)


def raises(error: BaseException) -> None:
    raise error


def test_a_call_that_returns_is_collected_with_its_pid_and_time() -> None:
    child = start_child(lambda: None, timeout_s=30)
    assert child.deadline == child.started + 30
    answered, result = wait_first([child])
    assert answered is child
    assert (result.finished, result.errno, result.detail, result.pid) == (True, 0, "", child.pid)
    assert 0 <= result.elapsed_s < 30
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped


@pytest.mark.parametrize(
    ("error", "code", "detail"),
    [
        (OSError(errno.EBUSY, "Device or resource busy"), errno.EBUSY, "Device or resource busy"),
        (OSError("no errno"), errno.EIO, "no errno"),
        (ValueError("boom"), errno.EIO, "ValueError('boom')"),
        (SystemExit(3), errno.EIO, "SystemExit(3)"),
    ],
)
def test_what_the_call_raises_comes_back_as_an_errno_and_a_detail(
    error: BaseException, code: int, detail: str
) -> None:
    _child, result = wait_first([start_child(lambda: raises(error), timeout_s=30)])
    assert (result.finished, result.errno, result.detail) == (True, code, detail)


def test_a_call_that_never_answers_is_killed_and_abandoned_at_its_deadline() -> None:
    child = start_child(never_returns, timeout_s=0.2)
    answered, result = wait_first([child])
    assert answered is child
    assert (result.finished, result.errno, result.detail, result.pid) == (
        False,
        errno.ETIMEDOUT,
        "no answer after 0.2 s",
        child.pid,
    )
    assert 0.2 <= result.elapsed_s < 10
    with pytest.raises(OSError):
        os.fstat(child.read_end)  # its pipe is closed
    for _ in range(100):  # SIGKILLed: gone once reaped
        try:
            if os.waitpid(child.pid, os.WNOHANG) != (0, 0):
                break
        except ChildProcessError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the abandoned child is still running")


def test_the_first_to_answer_comes_first_and_the_soonest_deadline_bounds_the_wait() -> None:
    slow = start_child(never_returns, timeout_s=0.3)
    later = start_child(never_returns, timeout_s=20)
    fast = start_child(lambda: None, timeout_s=20)
    answered, result = wait_first([slow, later, fast])
    assert answered is fast and result.finished
    began = time.monotonic()
    answered, result = wait_first([later, slow])
    assert answered is slow and not result.finished
    assert time.monotonic() - began < 10
    _abandon_for_test(later)


def _abandon_for_test(child: Child) -> None:
    os.kill(child.pid, 9)
    os.waitpid(child.pid, 0)
    os.close(child.read_end)


def test_a_report_that_is_not_a_number_is_an_eio() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.write(write_end, b"garbage from a dying child")
    os.close(write_end)
    result = _collect(Child(pid, read_end, time.monotonic(), 5))
    assert result == ChildResult(True, errno.EIO, "from a dying child", pid, result.elapsed_s)


def test_without_a_time_limit_every_deadline_is_kept() -> None:
    budget = Budget.of(None)
    assert budget.ends is None and budget.clip(5) == 5 and not budget.exhausted


def test_a_time_limit_clips_each_deadline_to_what_is_left() -> None:
    before = time.monotonic()
    budget = Budget.of(2)
    assert budget.ends is not None and before + 2 <= budget.ends <= time.monotonic() + 2
    assert budget.clip(1) == 1
    assert 1.5 < budget.clip(5) <= 2
    assert not budget.exhausted


def test_a_spent_time_limit_leaves_no_time_and_is_exhausted() -> None:
    budget = Budget(time.monotonic() - 1)
    assert budget.clip(5) == 0.0 and budget.exhausted
    assert Budget(time.monotonic()).exhausted  # reaching the end is spending it


class Exited(Exception):
    """os._exit, replaced: the child's body runs in this process, where mutation testing
    (and coverage) can see it; a real fork loses what the child did."""

    def __init__(self, status: int) -> None:
        self.status = status


@pytest.mark.parametrize(
    ("call", "report"),
    [
        (lambda: None, "0 "),
        (lambda: raises(OSError(errno.ENODEV, "No such device")), f"{errno.ENODEV} No such device"),
        (lambda: raises(OSError("no errno")), f"{errno.EIO} no errno"),
        (lambda: raises(KeyboardInterrupt()), f"{errno.EIO} KeyboardInterrupt()"),
    ],
)
def test_the_child_ignores_stop_signals_reports_one_line_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, call: Callable[[], None], report: str
) -> None:
    ignored: list[bool] = []
    monkeypatch.setattr(deadline, "ignore_in_child", lambda: ignored.append(True))

    def exit_(status: int) -> NoReturn:
        raise Exited(status)

    monkeypatch.setattr(os, "_exit", exit_)
    read_end, write_end = os.pipe()
    reader = os.dup(read_end)
    try:
        with pytest.raises(Exited) as exited:
            deadline._run_child(call, read_end, write_end)
        assert exited.value.status == 0
        assert ignored == [True]
        with pytest.raises(OSError) as closed:  # the child's copy of the read end is closed
            os.fstat(read_end)
        assert closed.value.errno == errno.EBADF
        os.close(write_end)
        assert os.read(reader, 4096).decode() == report
    finally:
        os.close(reader)


def test_the_child_exits_0_even_when_the_parent_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPIPE on the report (the parent died) must not unwind into the parent's stack."""
    monkeypatch.setattr(deadline, "ignore_in_child", lambda: None)

    def exit_(status: int) -> NoReturn:
        raise Exited(status)

    monkeypatch.setattr(os, "_exit", exit_)
    read_end, write_end = os.pipe()
    reader = os.dup(read_end)
    os.close(reader)  # no reader left once _run_child closes read_end: the write gets EPIPE
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        with pytest.raises(Exited) as exited:
            deadline._run_child(lambda: None, read_end, write_end)
        assert exited.value.status == 0
    finally:
        signal.signal(signal.SIGPIPE, previous)
        os.close(write_end)


def test_a_collected_child_reports_how_long_it_ran() -> None:
    child = start_child(lambda: time.sleep(0.05), timeout_s=30)
    _, result = wait_first([child])
    assert result.finished
    assert 0.05 <= result.elapsed_s < 30


def test_a_report_longer_than_pipe_buf_is_cut_and_a_split_character_replaced() -> None:
    """The parent reads one PIPE_BUF (4096 bytes, what one pipe write keeps whole); a long
    strerror cut in the middle of a UTF-8 character must still come back, not raise."""
    message = "x" + "é" * 3000  # "5 x" then two-byte characters: byte 4096 splits one
    child = start_child(lambda: raises(OSError(message)), timeout_s=30)
    _, result = wait_first([child])
    assert result.errno == errno.EIO
    assert result.detail == "x" + "é" * 2046 + "\ufffd"


def test_only_the_forked_child_runs_the_call() -> None:
    # Were the parent to take the child's branch, it would run the blocking call itself and
    # leave through os._exit(0): an exit status of 0, which nothing could tell from success.
    # In tests os._exit refuses in this process (conftest's no_exit_from_the_test_process).
    calls: list[int] = []
    child = start_child(lambda: calls.append(os.getpid()), timeout_s=30)
    _answered, result = wait_first([child])
    assert (result.finished, result.errno, result.pid) == (True, 0, child.pid)
    assert calls == []  # the call ran in the child's copy of this list, not here
