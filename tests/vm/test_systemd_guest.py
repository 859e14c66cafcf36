"""`systemctl kexec` with petitkexec's shutdown hook in a real Debian 12 systemd guest (issue 9).

One QEMU run per case (tests/vm/systemd_guest.py builds and boots the guest; the guest drives
itself): the tests below read what the console showed.

- kexec: root on a virtio-blk disk at 01:00.0 behind root port 00:02.0. `systemctl kexec`; the
  hook's report in the kernel log; a read-back by coreutils right before the kexec syscall; the
  second kernel's devices; petitkexec-verify.service in the second boot.
- hang: root on virtio-9p at 00:09.0, its protection lifted in /etc/petitkexec.toml. The hook's
  unbind hangs in p9_virtio_remove() until the hook's time limit (10 s, shorter than the 60 s
  unbind deadline) cuts it short; the hook exits 5 and reboots through the firmware (sysrq
  `b`), which with -no-reboot ends QEMU, well inside systemd's 90 s hook limit: systemd never
  runs its `kexec -e`, whose device_shutdown() would wait for the stuck remove() for ever.
- hang-past-limit: as hang, with the unbind's deadline (100 s) and the hook's time limit
  (120 s) past systemd's 90 s. systemd's SIGTERM reaches the hook's shell alone; the hook
  passes it on to petitkexec and waits; systemd's own `kexec -e` hangs in device_shutdown()
  behind the stuck remove(); petitkexec reports the hang (exit 5) and the hook syncs and
  reboots through the firmware all the same.
- missing-driver: as kexec, but the second kernel is loaded with module_blacklist=e1000e, so
  02:00.0 comes back without its driver: the second boot's verify must fail naming it, and
  nothing else.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ci import in_ci
from tests.vm import systemd_guest
from tests.vm.systemd_guest import (
    KEPT_OUT_BDF,
    KEPT_OUT_MODULE,
    ROOT_BDF,
    ROOT_PORT_BDF,
    VIRTFS_BDF,
    SystemdRun,
)

pytestmark = pytest.mark.vm

SYSTEMD_HOOK_LIMIT = 90  # seconds systemd-shutdown gives the hooks, then SIGTERM and kexec
SBIN = ("/sbin", "/usr/sbin")  # root's tools, when PATH lacks them
# Per QEMU run, about twice the slowest seen on a loaded 2-core machine (kexec: two Debian
# boots, ~170-280 s; hang: one boot on 9p, ~100-190 s; missing-driver: kexec's plus verify's
# 60 s of looking again for the absent driver, ~440 s). QEMU is killed when it runs out.
BOOT_TIMEOUT = {"kexec": 600, "hang": 420, "hang-past-limit": 600, "missing-driver": 900}
VERIFY_NOT_BACK = 6  # petitkexec's exit code: a function did not come back as it was


@pytest.fixture(scope="module")
def images(record_timing: Callable[[str, str], None]) -> systemd_guest.SystemdImages:
    missing = [
        tool
        for tool in systemd_guest.HOST_TOOLS
        if shutil.which(tool) is None and not any(Path(d, tool).exists() for d in SBIN)
    ]
    problem = None
    if missing:
        problem = f"the systemd guest needs {', '.join(missing)}: see .ci/apt-packages"
    elif os.geteuid() != 0:
        problem = "the systemd guest is built as root (mmdebstrap --mode=root, chroot)"
    if problem:
        if in_ci():
            pytest.fail(problem)
        pytest.skip(problem)
    started = time.monotonic()
    built = systemd_guest.build()
    info = built.info
    base = info.get("base_build_seconds")
    record_timing(
        "systemd guest image (this session)",
        f"{time.monotonic() - started:.1f}s (base: "
        f"{'cached' if base is None else f'mmdebstrap {base}s'}; image: "
        f"{str(info['image_seconds']) + 's' if info['image_built'] else 'cached'})",
    )
    return built


def _boot(
    images: systemd_guest.SystemdImages,
    mode: str,
    name: str,
    record_timing: Callable[[str, str], None],
) -> SystemdRun:
    run = systemd_guest.boot_systemd(images, mode=mode, timeout=BOOT_TIMEOUT[mode])
    record_timing(f"{name} wall", f"{run.wall_seconds:.1f}s (log {run.log_path})")
    return run


@pytest.fixture(scope="module")
def kexec_run(
    images: systemd_guest.SystemdImages, record_timing: Callable[[str, str], None]
) -> SystemdRun:
    run = _boot(images, "kexec", "systemd guest: systemctl kexec", record_timing)
    guest_seconds = run.systemctl_kexec_to_second_guest_seconds
    host_seconds = run.host_seconds_between("PKTEST-SYSTEMCTL-KEXEC ", "PETITKEXEC-SECOND-UP ")
    record_timing(
        "systemd guest: systemctl kexec -> second boot's marker",
        f"guest clocks {guest_seconds and round(guest_seconds, 1)}s, "
        f"host {host_seconds and round(host_seconds, 1)}s "
        f"(hook {run.hook_seconds and round(run.hook_seconds, 1)}s)",
    )
    return run


@pytest.fixture(scope="module")
def hang_run(
    images: systemd_guest.SystemdImages, record_timing: Callable[[str, str], None]
) -> SystemdRun:
    run = _boot(images, "hang", "systemd guest: hung unbind", record_timing)
    start = run.uptime("PKTEST-SYSTEMCTL-KEXEC")
    reset = run.printk_time("sysrq: Resetting")
    hung = run.printk_time("petitkexec: a step hung")
    synced = run.printk_time("petitkexec: file systems synced")
    record_timing(
        "systemd guest: systemctl kexec -> firmware reset (hung unbind)",
        f"guest clock {None if start is None or reset is None else round(reset - start, 1)}s "
        f"(hook {run.hook_seconds and round(run.hook_seconds, 1)}s, sync "
        f"{None if hung is None or synced is None else round(synced - hung, 2)}s)",
    )
    return run


@pytest.fixture(scope="module")
def hang_past_limit_run(
    images: systemd_guest.SystemdImages, record_timing: Callable[[str, str], None]
) -> SystemdRun:
    run = _boot(
        images, "hang-past-limit", "systemd guest: unbind hung past the limit", record_timing
    )
    detached = run.printk_time(systemd_guest.SHUTDOWN_DETACHED)
    times = {
        name: run.printk_time(text)
        for name, text in (
            ("SIGTERM", "petitkexec: SIGTERM (systemd's hook time limit)"),
            ("systemd's kexec", "Rebooting with kexec"),
            ("teardown exit", "petitkexec: teardown exit"),
            ("synced", "petitkexec: file systems synced"),
            ("reset", "sysrq: Resetting"),
        )
    }
    record_timing(
        "systemd guest: hooks start -> (unbind hung past the limit)",
        ", ".join(
            f"{name} +{None if t is None or detached is None else round(t - detached, 1)}s"
            for name, t in times.items()
        ),
    )
    return run


@pytest.fixture(scope="module")
def missing_driver_run(
    images: systemd_guest.SystemdImages, record_timing: Callable[[str, str], None]
) -> SystemdRun:
    run = _boot(
        images, "missing-driver", "systemd guest: second kernel without e1000e", record_timing
    )
    # verify keeps looking for the absent driver for its --wait (60 s) before it fails; both
    # lines are the second kernel's (the first kernel neither refuses e1000e nor verifies).
    refused = run.printk_time(f"Module {KEPT_OUT_MODULE} is blacklisted")
    verdict = run.printk_time("functions back as they were")
    waited = None if refused is None or verdict is None else round(verdict - refused, 1)
    record_timing(
        "systemd guest: e1000e refused -> verify's failure (second kernel)",
        f"guest clock {waited}s (second boot's SECOND-DONE at uptime {run.uptime('SECOND-DONE')}s)",
    )
    return run


# --- systemctl kexec ---------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(kexec_run: SystemdRun) -> None:
    assert kexec_run.analyze_exit == 0, kexec_run.tail()
    assert kexec_run.analyze_output == [], kexec_run.analyze_output


def test_hook_runs_the_teardown_and_reports_to_the_kernel_log(kexec_run: SystemdRun) -> None:
    run = kexec_run
    assert run.values("PKTEST-KEXEC-LOADED") == ["rc=0 loaded=1"], run.tail()
    assert run.hook_text, f"no `petitkexec:` lines from the hook\n{run.tail()}"
    # Every function here is unbound, protected or already quiet: nothing may be partial.
    assert run.teardown_exit == 0, "\n".join(run.hook_text)
    summary = [t for t in run.hook_text if t.split(":")[0] in ("unbound", "protected")]
    assert len(summary) == 2, "\n".join(run.hook_text)
    # systemd ran the hook after its own unmounting and before its own `kexec -e`.
    detached = run.printk_time(systemd_guest.SHUTDOWN_DETACHED)
    hook_end = run.printk_time("petitkexec: teardown exit")
    kexec = run.printk_time("systemd-shutdown[1]: Rebooting with kexec")
    assert detached is not None and hook_end is not None and kexec is not None, run.tail()
    assert detached <= hook_end <= kexec
    assert run.hook_seconds is not None and run.hook_seconds < SYSTEMD_HOOK_LIMIT


def test_root_disk_and_its_port_are_protected(kexec_run: SystemdRun) -> None:
    steps = kexec_run.steps
    report = "\n".join(kexec_run.hook_text)
    assert steps.get(ROOT_BDF, ("?", ""))[0] == "protect", report
    assert "backs /" in steps[ROOT_BDF][1], report
    assert steps.get(ROOT_PORT_BDF, ("?", ""))[0] == "protect", report
    assert f"above protected {ROOT_BDF}" in steps[ROOT_PORT_BDF][1], report
    assert any(t.startswith("protected: 2 (") and ROOT_BDF in t for t in kexec_run.hook_text)


def test_every_other_function_is_quiet_right_before_the_kexec(kexec_run: SystemdRun) -> None:
    run = kexec_run
    readback = run.readback("pre-kexec")
    first = run.first_devices
    assert first and set(readback) == set(first), (sorted(first), sorted(readback))
    # systemd-shutdown's `/sbin/kexec -e` went through the wrapper.
    kexec_start = run.values("KEXEC-START")
    assert kexec_start and kexec_start[0].split("args=", 1)[1].split() == ["-e"], kexec_start
    noisy = {
        bdf: (line.driver, f"{line.command:04x}" if line.command is not None else None)
        for bdf, line in readback.items()
        if bdf not in (ROOT_BDF, ROOT_PORT_BDF) and (line.driver or line.bus_master is not False)
    }
    assert noisy == {}, f"driver still bound or bus master on: {noisy}\n{run.tail()}"
    # The root file system is still mounted (read-only) when systemd execs kexec: its disk and
    # the port above it must still work.
    assert readback[ROOT_BDF].driver == first[ROOT_BDF] and readback[ROOT_BDF].bus_master
    assert readback[ROOT_PORT_BDF].driver == "pcieport" and readback[ROOT_PORT_BDF].bus_master


def test_second_kernel_rebinds_every_driver(kexec_run: SystemdRun) -> None:
    run = kexec_run
    assert run.second_up, run.tail()
    assert "kexec_core: Starting new kernel" in run.log
    assert run.second_devices == run.first_devices, run.tail()


def test_verify_passes_in_the_second_boot(kexec_run: SystemdRun) -> None:
    run = kexec_run
    assert run.verify_passed, f"{run.verify}\n" + "\n".join(run.values("PKTEST-VERIFY-LOG"))
    log = run.values("PKTEST-VERIFY-LOG")
    assert any(f"all {len(run.first_devices)} functions back" in line for line in log), log
    assert run.second_done and not run.timed_out, run.tail()


# --- a hung unbind -------------------------------------------------------------------------------


def test_hung_unbind_reboots_through_the_firmware_inside_the_hook_limit(
    hang_run: SystemdRun,
) -> None:
    run = hang_run
    assert run.values("PKTEST-ROOT")[0].split()[1] == "9p", run.tail()
    config = run.values("PKTEST-CONFIG")
    assert config and config[0].startswith("root:root 644 "), config
    # PKTEST-CONFIG prints the file: its second line stands alone on the console.
    unbind = f"unbind-timeout = {systemd_guest.HANG_UNBIND_TIMEOUT}"
    assert unbind in run.log.splitlines(), run.tail()
    limit = f"PETITKEXEC_TIME_LIMIT={systemd_guest.HANG_TIME_LIMIT}"
    assert [v.split()[0] for v in run.values("PKTEST-TIME-LIMIT")] == [limit], run.tail()
    # The time limit, not the unbind deadline, ended the share's unbind.
    cut = [t for t in run.hook_text if VIRTFS_BDF in t and "time limit" in t]
    assert cut, "\n".join(run.hook_text) or run.tail()
    assert run.teardown_exit == 5, "\n".join(run.hook_text)
    assert any(t.startswith("a step hung: rebooting") for t in run.hook_text), run.hook_text
    # sysrq b: an emergency restart, no device_shutdown(); -no-reboot makes it QEMU's exit.
    reset = run.printk_time("sysrq: Resetting")
    assert reset is not None, run.tail()
    # sysrq b syncs nothing and systemd's own sync comes after the hooks: the hook syncs first.
    synced = run.printk_time("petitkexec: file systems synced")
    assert synced is not None and synced <= reset, "\n".join(run.hook_text)
    assert not run.timed_out and not run.poweroff_hung and run.qemu_returncode == 0, run.tail()
    assert not run.second_up and "Starting new kernel" not in run.log
    assert "Rebooting with kexec" not in run.log  # systemd never got to its kexec
    # Inside systemd's hook limit: from the last message before the hooks run to the reset.
    detached = run.printk_time(systemd_guest.SHUTDOWN_DETACHED)
    assert detached is not None, run.tail()
    assert reset - detached < SYSTEMD_HOOK_LIMIT, (detached, reset)


def test_systemds_kill_reaches_petitkexec_and_a_hang_still_reboots_through_the_firmware(
    hang_past_limit_run: SystemdRun,
) -> None:
    run = hang_past_limit_run
    limit = f"PETITKEXEC_TIME_LIMIT={systemd_guest.PAST_LIMIT_TIME_LIMIT}"
    assert [v.split()[0] for v in run.values("PKTEST-TIME-LIMIT")] == [limit], run.tail()
    detached = run.printk_time(systemd_guest.SHUTDOWN_DETACHED)
    sigterm = run.printk_time("petitkexec: SIGTERM (systemd's hook time limit)")
    kexec = run.printk_time("systemd-shutdown[1]: Rebooting with kexec")
    teardown_exit = run.printk_time("petitkexec: teardown exit")
    synced = run.printk_time("petitkexec: file systems synced")
    reset = run.printk_time("sysrq: Resetting")
    report = "\n".join(run.hook_text)
    assert None not in (detached, sigterm, kexec, teardown_exit, synced, reset), (
        f"{report}\n{run.tail()}"
    )
    assert detached is not None and sigterm is not None and kexec is not None
    assert teardown_exit is not None and synced is not None and reset is not None
    # systemd's alarm: SIGTERM to the hook's shell, passed on to petitkexec; systemd went on
    # to its kexec, which hangs in device_shutdown() behind the stuck remove().
    assert sigterm - detached >= SYSTEMD_HOOK_LIMIT - 1, (detached, sigterm)
    assert "Starting new kernel" not in run.log and not run.second_up
    # petitkexec ended (the shell waited for it), reporting the hang, after the SIGTERM ...
    assert sigterm <= teardown_exit and run.teardown_exit == 5, report
    assert any(VIRTFS_BDF in t and " hung: " in t for t in run.hook_text), report
    # ... and the hook, alive, synced and reset the machine through the firmware.
    assert teardown_exit <= synced <= reset, report
    assert not run.timed_out and run.qemu_returncode == 0, run.tail()


# --- the second kernel without one driver ------------------------------------------------------


def test_module_blacklist_keeps_the_driver_out_of_the_second_kernel(
    missing_driver_run: SystemdRun,
) -> None:
    run = missing_driver_run
    assert run.second_up and "kexec_core: Starting new kernel" in run.log, run.tail()
    first = run.first_devices
    assert first.get(KEPT_OUT_BDF) == KEPT_OUT_MODULE, first
    assert run.kept_out == {KEPT_OUT_MODULE: False}, run.tail()
    # The modalias load (udev through kmod) reached init_module(), which the kernel refused.
    assert run.printk_time(f"Module {KEPT_OUT_MODULE} is blacklisted") is not None, run.tail()
    assert run.second_devices == {**first, KEPT_OUT_BDF: None}, run.tail()


def test_verify_fails_naming_the_function_without_its_driver(
    missing_driver_run: SystemdRun,
) -> None:
    run = missing_driver_run
    assert run.verify == {
        "state": "failed",
        "result": "exit-code",
        "status": str(VERIFY_NOT_BACK),
        "condition": "yes",
    }, run.tail()
    assert len(run.verify_differences) == 1, run.verify_log
    named = run.verify_differences[0]
    assert named.startswith(f"{KEPT_OUT_BDF} unbound ") and KEPT_OUT_MODULE in named, named
    total = len(run.first_devices)
    assert f"{total - 1} of {total} functions back as they were" in run.verify_log, run.verify_log
    assert run.second_done and not run.timed_out, run.tail()
