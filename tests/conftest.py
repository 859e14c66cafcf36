from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

import petitkexec.handoff
from tests import simlocks
from tests.simkernel import SimFunction, SimKernel, root_port


@pytest.fixture(autouse=True)
def sysfs_writes_are_uninterruptible(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """SIGKILL to a child inside a simulated sysfs write waits until the write returns, as
    for a task in uninterruptible sleep; at the end of the test every hung remove() returns,
    so no child outlives it for long."""
    monkeypatch.setattr(os, "kill", simlocks.kill)
    yield
    simlocks.release_everything()


@pytest.fixture(autouse=True)
def no_reboot_syscall(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No test hands the machine it runs on to kexec, whatever path reaches the handoff (a
    mutant of run.py that drops the binary, mutation testing's run as root): the reboot
    syscall answers as a kernel with no image loaded (kernel_kexec(): EINVAL). The list
    returned records each call."""
    calls: list[str] = []

    def refused() -> petitkexec.handoff.HandoffResult:
        calls.append("reboot(LINUX_REBOOT_CMD_KEXEC)")
        return petitkexec.handoff.HandoffResult(
            ("reboot(LINUX_REBOOT_CMD_KEXEC)",), errno.EINVAL, os.strerror(errno.EINVAL)
        )

    monkeypatch.setattr(petitkexec.handoff, "_reboot_syscall", refused)
    return calls


@pytest.fixture(autouse=True)
def no_exit_from_the_test_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """os._exit refuses in the process running the test and exits in any child it forked.
    Code that leaves through os._exit where it should not (a child's body run by the parent,
    as a mutant of deadline.start_child's `pid == 0` does) would otherwise end the whole test
    run at once with status 0, which reads as success; here it fails the test instead."""
    test_process, real_exit = os.getpid(), os._exit

    def exit_only_in_a_child(code: int) -> NoReturn:
        if os.getpid() == test_process:
            raise AssertionError(f"os._exit({code}) in the process running the tests")
        real_exit(code)

    monkeypatch.setattr(os, "_exit", exit_only_in_a_child)


# The real-kernel lane's timings (tests/vm/conftest.py's record_timing) pass from pytest-xdist's
# workers to the controller through files in this folder: a worker's stash is its own. These
# hooks live here because the controller loads only this conftest (it collects nothing).
TIMINGS_DIR = "PETITKEXEC_VM_TIMINGS_DIR"


def pytest_configure(config: pytest.Config) -> None:
    # Set before the workers start, so they inherit it.
    if not hasattr(config, "workerinput") and TIMINGS_DIR not in os.environ:
        os.environ[TIMINGS_DIR] = tempfile.mkdtemp(prefix="petitkexec-vm-timings-")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if hasattr(config, "workerinput"):
        return
    folder = Path(os.environ.get(TIMINGS_DIR, "/nonexistent"))
    lines = [
        line
        for path in sorted(folder.glob("*.txt"))
        for line in path.read_text().splitlines()
        if line
    ]
    if lines:
        terminalreporter.section("vm lane timings")
        for line in lines:
            terminalreporter.write_line(line)
    shutil.rmtree(folder, ignore_errors=True)


def q35_like() -> list[SimFunction]:
    """The QEMU q35 guest's shape: root ports with endpoints, a PCIe-to-PCI bridge, SR-IOV."""
    return [
        SimFunction("0000:00:00.0", 0x8086, 0x29C0, 0x060000, command=0x0000),
        SimFunction("0000:00:01.0", 0x1234, 0x1111, 0x030000, command=0x0003),  # VGA, no driver
        root_port("0000:00:02.0"),
        SimFunction(
            "0000:01:00.0",
            0x1B36,
            0x0010,
            0x010802,
            parent="0000:00:02.0",
            driver="nvme",
            multifunction=True,
            reset_methods=("flr", "bus"),
        ),
        SimFunction(
            "0000:01:00.1",
            0x1B36,
            0x0010,
            0x010802,
            parent="0000:00:02.0",
            physfn="0000:01:00.0",
            driver="nvme",
        ),
        SimFunction(
            "0000:01:00.2",
            0x1B36,
            0x0010,
            0x010802,
            parent="0000:00:02.0",
            physfn="0000:01:00.0",
            driver="nvme",
        ),
        root_port("0000:00:02.1", reset_subordinate=True),
        SimFunction(
            "0000:02:00.0",
            0x8086,
            0x10D3,
            0x020000,
            parent="0000:00:02.1",
            driver="e1000e",
            reset_methods=("flr", "pm", "bus"),
        ),
        root_port("0000:00:02.2"),
        SimFunction(
            "0000:03:00.0",
            0x1B36,
            0x000D,
            0x0C0330,
            parent="0000:00:02.2",
            driver="xhci_hcd",
            remove_clears_master=True,
            reset_methods=("bus",),
        ),
        root_port("0000:00:02.3", driver=None, command=0x0107, device=0x000E),  # pcie-pci-bridge
        SimFunction(
            "0000:04:01.0", 0x8086, 0x100E, 0x020000, parent="0000:00:02.3", driver="e1000"
        ),
        SimFunction("0000:00:03.0", 0x1AF4, 0x1044, 0x00FF00, driver="virtio-pci"),
        SimFunction(
            "0000:00:1f.0",
            0x8086,
            0x2918,
            0x060100,
            driver="lpc_ich",
            can_unbind=False,
            command=0x0007,
            multifunction=True,
        ),
        SimFunction("0000:00:1f.2", 0x8086, 0x2922, 0x010601, driver="ahci"),
        SimFunction("0000:00:1f.3", 0x8086, 0x2930, 0x0C0500, command=0x0003),
    ]


SimFactory = Callable[..., SimKernel]


@pytest.fixture
def make_sim(tmp_path: Path) -> SimFactory:
    def make(functions: list[SimFunction] | None = None, **kwargs: object) -> SimKernel:
        return SimKernel(tmp_path / "sys", q35_like() if functions is None else functions, **kwargs)  # type: ignore[arg-type]

    return make
