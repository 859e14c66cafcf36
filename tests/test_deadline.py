"""Blocking calls in forked children with a deadline (petitkexec.deadline), on real children:
what comes back when the call returns, raises, or never answers, and the overall budget."""

from __future__ import annotations

import errno
import os
import time

import pytest

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
