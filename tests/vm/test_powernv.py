"""petitkexec on a PowerNV kernel: Debian's ppc64el 6.1 on QEMU's powernv9 (skiboot/OPAL, one
PCI domain per PHB4, no driver on any bridge). Four boots: `exec` (with `plan` first);
`exec --hot-reset`; the single-file build (scripts/build-zipapp) in an image without ldconfig
or ld cache, with `exec --dry-run` first and integrity lockdown raised before its exec; a
mounted 9p share, protected, then unprotected into a hung unbind. What is checked comes from
the guest's own busybox read-back, skiboot's log (/sys/firmware/opal/msglog) and the second
kernel, not from petitkexec's report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.vm import powernv
from tests.vm.guest import GuestRun, ReadbackLine
from tests.vm.images.build import Images
from tests.vm.images.lanes import Lane

pytestmark = pytest.mark.vm

HOST_TOOLS = (powernv.QEMU, "apt-get", "apt-cache", "dpkg-deb", "depmod", "readelf")
EXEC = "petitkexec exec --kexec /usr/sbin/kexec-readback"
EXPECTED = powernv.EXPECTED_DRIVERS
ENDPOINTS = {bdf for bdf, driver in EXPECTED.items() if driver is not None}
# Root ports with something below: the empty one on PHB 4 has no bus to reset.
RESET_PORTS = {"0000:00:00.0", "0001:00:00.0", "0002:00:00.0", "0003:00:00.0", "0005:00:00.0"}
STEP = re.compile(
    r"^\[\s*\d+/\d+\] (?P<bdf>\S+) (?P<action>\S+) +(?P<status>\w+): (?P<detail>.*) "
    r"\((?P<ms>\d+\.\d) ms\)$"
)
# skiboot's PHB4 hot reset, as it logs it in the in-memory console (all levels).
OPAL_RESET = re.compile(
    r"\[\s*(?P<t>\d+\.\d+),\d\] PHB#(?P<phb>[0-9a-f]{4})\[\d+:\d+\]: (?P<what>.*)"
)

Boot = Callable[..., GuestRun]
Record = Callable[[str, str], None]


def stamp(word: str) -> str:
    return f'read -r up _ < /proc/uptime; echo "{word} uptime=$up"\n'


def uptime(run: GuestRun, word: str) -> float:
    match = re.search(rf"^{word} uptime=(\d+\.\d+)", run.log, re.M)
    assert match, f"no {word} line\n{run.tail()}"
    return float(match[1])


def steps(run: GuestRun, action: str) -> dict[str, re.Match[str]]:
    found = {}
    for line in run.log.splitlines():
        match = STEP.match(line)
        if match and match["action"] == action:
            found[match["bdf"]] = match
    return found


def assert_quiet_before_kexec(run: GuestRun) -> None:
    """Right before the kexec syscall no function has a driver or bus master on."""
    readback = run.readback("pre-kexec")
    assert set(readback) == set(EXPECTED), run.tail(120)
    loud = {
        bdf: (line.driver, line.command)
        for bdf, line in readback.items()
        if line.driver is not None or line.bus_master is not False
    }
    assert loud == {}, run.tail(120)


def assert_second_kernel_reprobed(run: GuestRun) -> None:
    assert run.second_up, run.tail(120)
    assert run.second_devices == EXPECTED, run.tail(120)
    assert run.second_nvme == ["nvme0n1"], run.tail()
    assert len([n for n in run.second_net if n != "lo"]) == 2 and run.second_usb, run.tail()
    second = run.readback("second")
    assert all(second[bdf].bus_master for bdf in ENDPOINTS), run.tail()  # drivers enabled it


def exec_to_second_seconds(run: GuestRun) -> float:
    """PK-START → the second kernel's marker on guest clocks (purgatory not included)."""
    t = run.guest_times
    return t["starting_new_kernel"] - uptime(run, "PK-START") + t["second_up"]


@pytest.fixture(scope="session")
def powernv_images(lane_images: Callable[[Lane, Sequence[str]], Images]) -> Images:
    return lane_images(powernv.LANE, HOST_TOOLS)


@pytest.fixture
def boot_pnv(powernv_images: Images, timed_boot: Callable[[Boot, Images], Boot]) -> Boot:
    return timed_boot(powernv.boot_powernv, powernv_images)


@pytest.fixture(scope="module")
def exec_run(powernv_images: Images, record_timing: Record) -> GuestRun:
    """One boot for the plain exec and for what `plan` shows: plan first, then exec."""
    run = powernv.boot_powernv(
        "if [ -d /sys/firmware/opal ]; then echo OPAL-FIRMWARE present; "
        "else echo OPAL-FIRMWARE absent; fi\n"
        "petitkexec plan > /tmp/plan.txt 2>&1; echo PLAN-EXIT $?\n"
        "sed 's/^/PLAN| /' /tmp/plan.txt\n" + stamp("PK-START") + f"{EXEC}\necho PK-EXIT $?\n",
        second_scenario="sed 's/^/SECOND-CONSOLE /' /proc/consoles\n",
        images=powernv_images,
    )
    record_timing("powernv plan+exec boot wall", f"{run.wall_seconds:.1f}s (log {run.log_path})")
    return run


def test_powernv_exec_leaves_every_function_without_driver_and_bus_master(
    exec_run: GuestRun, record_timing: Record
) -> None:
    run = exec_run
    assert run.exit_code is None and "PK-EXIT" not in run.log, run.tail(120)  # it kexec'd
    assert_quiet_before_kexec(run)
    # No bridge has a driver on PowerNV, so petitkexec cleared the bus master of every root
    # port (and switch port) itself, after the endpoints below them.
    cleared = steps(run, "clear-bus-master")
    assert {bdf for bdf, m in cleared.items() if m["detail"] == "bus master cleared"} == {
        bdf for bdf, driver in EXPECTED.items() if driver is None
    }, run.tail(120)
    assert set(steps(run, "unbind")) == ENDPOINTS, run.tail(120)
    assert_second_kernel_reprobed(run)
    assert "SECOND-CONSOLE hvc0" in run.log, run.tail()
    record_timing(
        "powernv exec: petitkexec start -> kexec start (guest)",
        f"{uptime(run, 'KEXEC-START') - uptime(run, 'PK-START'):.2f}s",
    )
    record_timing(
        "powernv exec: petitkexec start -> second marker (guest clocks)",
        f"{exec_to_second_seconds(run):.2f}s",
    )
    record_timing(
        "powernv exec: kexec start -> second marker (host arrival)",
        f"{run.kexec_to_second_host_seconds:.2f}s",
    )


def test_powernv_is_recognised_and_plan_shows_one_domain_per_phb(exec_run: GuestRun) -> None:
    run = exec_run
    # What Kernel.is_powernv() checks before it would ever refuse a raw SBR.
    assert "OPAL-FIRMWARE present" in run.log, run.tail()
    assert "PLAN-EXIT 0" in run.log, run.tail(120)
    plan = [line.removeprefix("PLAN| ") for line in run.lines_starting("PLAN| ")]
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in plan:
        if line.startswith("PCI domain "):
            current = sections.setdefault(line.split()[2], [])
        elif match := re.search(r"([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d) ", line):
            current.append(match[1])
    assert list(sections) == [f"{domain:04x}" for domain in range(6)], "\n".join(plan)
    for domain, functions in sections.items():
        assert functions == sorted(b for b in EXPECTED if b.startswith(domain)), "\n".join(plan)
        # Each section starts with its PHB's root port, at the top of the tree.
        assert plan[plan.index(f"PCI domain {domain}") + 1].startswith(
            f"└─ {domain}:00:00.0 1014:04c1 class 060400 driver - [bridge]"
        )
    assert "13 functions: 5 unbind, 8 clear-bus-master" in plan, "\n".join(plan)


def test_powernv_hot_reset_goes_through_opal_side_by_side(
    boot_pnv: Boot, record_timing: Record
) -> None:
    opal_dump = (
        "strings /sys/firmware/opal/msglog | grep -E 'PHB#[0-9a-f]{4}\\[' | sed 's/^/OPAL-%s /'"
    )
    run = boot_pnv(
        # A readback wrapper that first copies skiboot's log of the resets to the console.
        "cat > /tmp/kexec-opal <<'EOF'\n#!/bin/sh\n"
        f'{opal_dump % "AFTER"} > /dev/console\nexec /usr/sbin/kexec-readback "$@"\nEOF\n'
        "chmod +x /tmp/kexec-opal\n"
        f"{opal_dump % 'BEFORE'}\n" + stamp("PK-START") + "petitkexec exec --kexec /tmp/kexec-opal "
        "--hot-reset\necho PK-EXIT $?\n"
    )
    assert run.exit_code is None and "PK-EXIT" not in run.log, run.tail(120)
    resets = steps(run, "reset-bus")
    assert set(resets) == RESET_PORTS, run.tail(120)
    for match in resets.values():
        # Kernel-mediated (pci_reset_bus → pnv_pci_reset_secondary_bus → OPAL), never raw.
        assert match["status"] == "done" and match["detail"].startswith("reset_subordinate;")
        assert "raw" not in match.string
    # skiboot logged one hot reset, and its link coming back, for each of those PHBs.
    before = set(run.lines_starting("OPAL-BEFORE "))
    new = [
        m
        for line in run.lines_starting("OPAL-AFTER ")
        if "OPAL-BEFORE " + line.removeprefix("OPAL-AFTER ") not in before
        and (m := OPAL_RESET.search(line))
    ]
    started = {m["phb"]: float(m["t"]) for m in new if m["what"].strip() == "HRESET: Starts"}
    stable = {m["phb"]: float(m["t"]) for m in new if m["what"].strip() == "LINK: Link is stable"}
    assert set(started) == set(stable) == {p[:4] for p in RESET_PORTS}, run.tail(120)
    assert not re.search(r"EEH.*(Frozen|failure|Recover)", run.log), run.tail(120)
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)

    elapsed = {bdf: float(m["ms"]) / 1000 for bdf, m in resets.items()}
    teardown = uptime(run, "KEXEC-START") - uptime(run, "PK-START")
    # Side by side: the whole teardown is well below the resets' sum (each ~5 s in TCG).
    assert teardown < 0.6 * sum(elapsed.values()), (teardown, elapsed)
    record_timing(
        "powernv hot-reset: each reset_subordinate (petitkexec's clock)",
        ", ".join(f"{bdf[:4]} {s:.2f}s" for bdf, s in sorted(elapsed.items())),
    )
    record_timing(
        "powernv hot-reset: OPAL HRESET start -> link stable (skiboot's clock)",
        ", ".join(f"{p} {stable[p] - started[p]:.2f}s" for p in sorted(started)),
    )
    record_timing(
        "powernv hot-reset: resets summed vs petitkexec start -> kexec start (guest)",
        f"{sum(elapsed.values()):.2f}s vs {teardown:.2f}s",
    )
    record_timing(
        "powernv hot-reset: petitkexec start -> second marker (guest clocks)",
        f"{exec_to_second_seconds(run):.2f}s",
    )
    slow_calls = re.findall(r"Spent (\d+) msecs in OPAL call (\d+)", run.log)
    record_timing(
        "powernv hot-reset: skiboot 'Spent N msecs in OPAL call' warnings",
        ", ".join(f"call {call}: {ms} ms" for ms, call in slow_calls) or "none",
    )


# --------------------------------------------------------------------------- the single file

REPO = Path(__file__).resolve().parents[2]
GUEST_PYTHON = "3.11"  # Debian 12's, as the guest has it (python3.11-minimal)
ZIPAPP = "/opt/petitkexec.pyz"
# As a firmware image runs it: no site-packages (the image's pip-installed petitkexec and its
# dependencies are out of reach), no PYTHON* variables.
ZIPAPP_RUN = f"python3 -I -S {ZIPAPP}"
# What the archive's own loader finds in this image, with pyudev's lookup beside it.
LIBUDEV_PROBE = f"""python3 -I -S - <<'PY'
import ctypes.util, sys
sys.path.insert(0, "{ZIPAPP}")
import petitkexec
from petitkexec.discovery import udev_context
print("ZIPAPP-FROM", petitkexec.__file__)
print("ZIPAPP-FIND-LIBRARY", ctypes.util.find_library("udev"))
print("ZIPAPP-UDEV-CONTEXT", udev_context() is not None)
PY
"""
# The firmware runtime of bench/firmware_footprint.py: the interpreter, only the stdlib modules
# of bench/stdlib-closure.txt (bytecode only), the C libraries they need beyond glibc, and the
# archive stored without deflate. -S: site is not in the closure. Its own prefix (getpath finds
# os.pyc next to the binary's ../lib/python3.11), so the image's full stdlib is not on the path.
FIRMWARE = "/opt/fw"
FIRMWARE_PYTHON = (
    f"LD_LIBRARY_PATH={FIRMWARE}/usr/lib/powerpc64le-linux-gnu {FIRMWARE}/usr/bin/python3.11 -I -S"
)
FIRMWARE_RUN = f"{FIRMWARE_PYTHON} {FIRMWARE}/petitkexec.pyz"
FIRMWARE_PROBE = (
    f"chmod 755 {FIRMWARE}/usr/bin/python3.11\n"
    f"{FIRMWARE_PYTHON} -c 'import sys; print(\"FW-PATH\", *sys.path)'\n"
    + f"{FIRMWARE_RUN} snapshot -o /tmp/fw-snapshot.json; echo FWSNAP-EXIT $?\n"
    + f"{FIRMWARE_RUN} verify --against /tmp/fw-snapshot.json > /tmp/fwverify.txt 2>&1;"
    " echo FWVERIFY-EXIT $?\n"
    "sed 's/^/FWVERIFY| /' /tmp/fwverify.txt\n"
)
DRY_RUN_LINE = "dry run: would now run /usr/sbin/kexec-readback -e"


@pytest.fixture(scope="session")
def zipapp(tmp_path_factory: pytest.TempPathFactory, record_timing: Record) -> bytes:
    """scripts/build-zipapp for the guest's Python, bytecode only (what a firmware image
    ships), into a temporary folder: dist/ belongs to whoever else builds in this checkout.
    The pinned wheels are kept in the lane's cache, so a rebuild needs no network."""
    archive = tmp_path_factory.mktemp("zipapp") / "petitkexec.pyz"
    command = [
        str(REPO / "scripts" / "build-zipapp"),
        "--python-version",
        GUEST_PYTHON,
        "--no-sources",
        "--wheels",
        str(powernv.cache_dir() / "zipapp-wheels"),
        "-o",
        str(archive),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record_timing("powernv zipapp (bytecode only)", f"{archive.stat().st_size} bytes")
    return archive.read_bytes()


@pytest.fixture(scope="session")
def firmware_runtime(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """bench/firmware_footprint.py's runtime for the guest's packages, as extra files below
    FIRMWARE (the closure is the list the unit test holds every command to)."""
    sys.path.insert(0, str(REPO / "bench"))
    import firmware_footprint as footprint

    scratch = tmp_path_factory.mktemp("firmware")
    root = powernv.cache_dir() / "pkgroot"
    archive = footprint.build_archive(GUEST_PYTHON, scratch)
    closure = footprint.closure_files(footprint.read_closure_list(), root)
    out = scratch / "runtime"
    parts = footprint.build_runtime(f"/usr/bin/python{GUEST_PYTHON}", closure, archive, root, out)
    return {
        f"{FIRMWARE.lstrip('/')}/{file.relative_to(out)}": file.read_bytes()
        for files in parts.values()
        for file in files
    }


def retagged(readback: dict[str, ReadbackLine], tag: str) -> dict[str, ReadbackLine]:
    return {
        bdf: ReadbackLine(line.bdf, line.driver, line.command, tag)
        for bdf, line in readback.items()
    }


@pytest.fixture(scope="module")
def zipapp_run(
    powernv_images: Images,
    zipapp: bytes,
    firmware_runtime: dict[str, bytes],
    record_timing: Record,
) -> GuestRun:
    """One boot, three checks that do not disturb each other, in this order: `exec --dry-run`
    between two read-backs (it changes nothing); the zipapp's `plan`; integrity lockdown
    raised (stage 1 has loaded the kernel already: lockdown forbids kexec_load, not the
    reboot(LINUX_REBOOT_CMD_KEXEC) of `kexec -e`); the zipapp's `exec` into the second kernel.
    `plan`, `snapshot`, `verify` and `exec` run in the firmware runtime (FIRMWARE) alone."""
    run = powernv.boot_powernv(
        "if command -v ldconfig >/dev/null || [ -e /etc/ld.so.cache ]; then "
        "echo LD-CACHE present; else echo LD-CACHE none; fi\n"
        "readback before\n"
        + stamp("DRY-START")
        + f"{EXEC} --dry-run > /tmp/dry.txt 2>&1; echo DRY-EXIT $?\n"
        + stamp("DRY-END")
        + "sed 's/^/DRY| /' /tmp/dry.txt\n"
        "readback after\n"
        f"{LIBUDEV_PROBE}"
        + FIRMWARE_PROBE
        + stamp("ZPLAN-START")
        + f"{FIRMWARE_RUN} plan > /tmp/plan.txt 2>&1; echo ZPLAN-EXIT $?\n"
        + stamp("ZPLAN-END")
        + "sed 's/^/ZPLAN| /' /tmp/plan.txt\n"
        "echo integrity > /sys/kernel/security/lockdown\n"
        "sed 's/^/LOCKDOWN-NOW /' /sys/kernel/security/lockdown\n"
        + stamp("PK-START")
        + f"{FIRMWARE_RUN} exec --kexec /usr/sbin/kexec-readback\necho PK-EXIT $?\n",
        extra_files={ZIPAPP.lstrip("/"): zipapp, **firmware_runtime},
        images=powernv_images,
    )
    record_timing(
        "powernv zipapp+dry-run+lockdown boot wall", f"{run.wall_seconds:.1f}s (log {run.log_path})"
    )
    return run


def test_powernv_zipapp_without_ldconfig_plans_and_execs_into_the_second_kernel(
    zipapp_run: GuestRun, record_timing: Record
) -> None:
    run = zipapp_run
    assert "LD-CACHE none" in run.log, run.tail()
    # pyudev's own lookup (`ldconfig -p`) finds nothing here; the archive's loader does.
    assert "ZIPAPP-FIND-LIBRARY None" in run.log, run.tail(120)
    assert "ZIPAPP-UDEV-CONTEXT True" in run.log, run.tail(120)
    assert f"ZIPAPP-FROM {ZIPAPP}/petitkexec/__init__.pyc" in run.log, run.tail(120)
    assert "ZPLAN-EXIT 0" in run.log, run.tail(120)
    plan = [line.removeprefix("ZPLAN| ") for line in run.lines_starting("ZPLAN| ")]
    assert "13 functions: 5 unbind, 8 clear-bus-master" in plan, "\n".join(plan)
    # Discovery went through libudev: no fallback to plain sysfs, and nothing crashed.
    assert "libudev not found" not in run.log and "Traceback" not in run.log, run.tail(120)
    assert run.exit_code is None and "PK-EXIT" not in run.log, run.tail(120)
    assert_quiet_before_kexec(run)
    assert_second_kernel_reprobed(run)
    # plan above, snapshot, verify and exec ran in the firmware runtime alone: its own prefix,
    # no other stdlib on the path; a module missing from the closure would have failed them.
    fw_path = next(iter(run.lines_starting("FW-PATH "))).split()[1:]
    assert fw_path and all(p.startswith(FIRMWARE) for p in fw_path), fw_path
    assert "FWSNAP-EXIT 0" in run.log and "FWVERIFY-EXIT 0" in run.log, run.tail(120)
    verified = [line.removeprefix("FWVERIFY| ") for line in run.lines_starting("FWVERIFY| ")]
    assert verified[-1:] == ["all 13 functions back as they were"], verified
    record_timing(
        "powernv: zipapp plan vs pip-installed exec --dry-run, same boot (guest)",
        f"{uptime(run, 'ZPLAN-END') - uptime(run, 'ZPLAN-START'):.2f}s vs "
        f"{uptime(run, 'DRY-END') - uptime(run, 'DRY-START'):.2f}s",
    )
    record_timing(
        "powernv zipapp exec under lockdown: start -> kexec start (guest)",
        f"{uptime(run, 'KEXEC-START') - uptime(run, 'PK-START'):.2f}s",
    )


def test_powernv_integrity_lockdown_after_the_load_clears_bus_master_through_enable(
    zipapp_run: GuestRun,
) -> None:
    run = zipapp_run
    assert "STAGE1-KEXEC-LOADED rc=0 kexec_loaded=1" in run.log, run.tail()
    assert "LOCKDOWN-NOW none [integrity] confidentiality" in run.log, run.tail()
    # No bridge has a driver on PowerNV: petitkexec clears each one's bus master itself, and
    # lockdown refuses its config write (EPERM), so every one goes through `enable`.
    cleared = steps(run, "clear-bus-master")
    bridges = {bdf for bdf, driver in EXPECTED.items() if driver is None}
    assert set(cleared) == bridges, run.tail(120)
    for match in cleared.values():
        assert match["status"] == "done", match.string
        assert match["detail"].startswith(
            "bus master cleared through enable (config writes blocked: EPERM; count"
        ), match.string
    assert_quiet_before_kexec(run)
    assert run.second_up, run.tail(120)


def test_powernv_dry_run_changes_nothing(zipapp_run: GuestRun) -> None:
    run = zipapp_run
    assert "DRY-EXIT 0" in run.log, run.tail(120)
    assert f"DRY| {DRY_RUN_LINE}" in run.log, run.tail(120)
    before = run.readback("before")
    assert set(before) == set(EXPECTED), run.tail(120)
    assert retagged(run.readback("after"), "before") == before
    # Every endpoint kept its driver and bus master through the dry run.
    assert all(before[bdf].driver == EXPECTED[bdf] and before[bdf].bus_master for bdf in ENDPOINTS)


# --------------------------------------------------------------------------- a hung unbind

VIRTFS = powernv.VIRTFS_BDF
VIRTFS_PORT = "0004:00:00.0"
# p9_virtio_remove() warns every 10 s while the share is still in use: the kernel's own word
# that remove() is stuck. Waited for after the run (at most 20 s), then copied to the console.
P9_WAITING = "p9_virtio_remove: waiting for device in use"
WAIT_FOR_P9_WARNING = (
    f"n=0; until dmesg | grep -q '{P9_WAITING}' || [ $n -ge 20 ]; do sleep 1; n=$((n + 1)); done\n"
    f"dmesg | grep -m1 '{P9_WAITING}' | sed 's/^/KERNEL| /'\n"
)


@pytest.fixture(scope="module")
def hung_run(
    powernv_images: Images, tmp_path_factory: pytest.TempPathFactory, record_timing: Record
) -> GuestRun:
    """A boot of its own: the hung remove keeps the device lock, so nothing may come after it
    (power-off hangs too, in device_shutdown(); QEMU is killed 5 s after the last line)."""
    share = tmp_path_factory.mktemp("share")
    (share / "hello.txt").write_text("from the host\n")
    run = powernv.boot_powernv(
        "mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt && sed 's/^/SHARE /' "
        "/mnt/hello.txt\n"
        "petitkexec plan > /tmp/plan.txt 2>&1; echo PLAN-EXIT $?\n"
        "sed 's/^/PLAN| /' /tmp/plan.txt\n"
        + stamp("PK-START")
        + f"{EXEC} --unprotect {VIRTFS} --unbind-timeout 5\necho PK-EXIT $?\n"
        + stamp("PK-END")
        + "readback after\n"
        + WAIT_FOR_P9_WARNING,
        virtfs_dir=share,
        poweroff_grace=5,
        images=powernv_images,
    )
    record_timing(
        "powernv 9p hung-unbind boot wall", f"{run.wall_seconds:.1f}s (log {run.log_path})"
    )
    return run


def test_powernv_a_mounted_9p_share_is_protected_by_default(hung_run: GuestRun) -> None:
    run = hung_run
    assert "SHARE from the host" in run.log, run.tail(120)
    assert "PLAN-EXIT 0" in run.log, run.tail(120)
    plan = "\n".join(line.removeprefix("PLAN| ") for line in run.lines_starting("PLAN| "))
    assert re.search(
        rf"{VIRTFS} 1af4:\S+ class \S+ driver virtio-pci +→ +protect \(9p share 'host0' "
        r"mounted at /mnt",
        plan,
    ), plan
    assert re.search(rf"{VIRTFS_PORT} .*→ +protect \(above protected {VIRTFS}", plan), plan


def test_powernv_unprotected_9p_unbind_hits_its_deadline_and_there_is_no_handoff(
    hung_run: GuestRun, record_timing: Record
) -> None:
    run = hung_run
    assert "PK-EXIT 5" in run.log, run.tail(120)  # ExitCode.HUNG
    assert re.search(
        rf"{VIRTFS} unbind +hung: virtio-pci remove\(\) did not return within 5 s", run.log
    ), run.tail(120)
    assert "KEXEC-START" not in run.log and not run.second_up, run.tail(120)
    assert any(P9_WAITING in line for line in run.lines_starting("KERNEL| ")), run.tail(120)
    after = run.readback("after")  # everything else was rolled back: drivers bound again
    assert {bdf: after[bdf].driver for bdf in ENDPOINTS} == {
        bdf: EXPECTED[bdf] for bdf in ENDPOINTS
    }, run.tail(120)
    record_timing(
        "powernv 9p: petitkexec start -> exit 5 (guest)",
        f"{uptime(run, 'PK-END') - uptime(run, 'PK-START'):.2f}s",
    )
