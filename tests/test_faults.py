"""The fault matrix of the README's "Failure behaviour" table, one test per row, on the
simulated kernel through the command line: what petitkexec does and the exit code it ends with.
The starred rows run in the q35 guest too (tests/vm/test_faults_guest.py)."""

from __future__ import annotations

import ctypes.util
import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import petitkexec.discovery as discovery
import petitkexec.run
from petitkexec.bdf import Bdf
from petitkexec.environment import Environment
from petitkexec.errors import ExitCode
from petitkexec.handoff import find_kexec
from petitkexec.model import Topology
from tests.clirun import environment, fake_kexec, invoke, shell_script
from tests.conftest import SimFactory, q35_like
from tests.simkernel import SimFunction, SimKernel, root_port

NIC = "0000:02:00.0"  # e1000e behind root port 00:02.1
NVME_PF = "0000:01:00.0"  # with VFs 01:00.1 and 01:00.2
# The deadline of a step that hangs: long enough that no step that returns misses it on a
# loaded machine (an unbind child under mutation testing's tracing took over 0.3 s).
HANG_S = "2"
AHCI = "0000:00:1f.2"
ISA_BRIDGE = "0000:00:1f.0"  # lpc_ich cannot be unbound, bus master on: clear-bus-master


def bound(sim: SimKernel) -> dict[str, str | None]:
    return {f.bdf: sim.driver_of(f.bdf) for f in sim.functions if sim.exists(f.bdf)}


def hanging(bdf: str, **behaviour: object) -> list[SimFunction]:
    """The q35 machine with one function's driver behaving badly."""
    return [
        SimFunction(**{**f.__dict__, **behaviour}) if f.bdf == bdf else f  # type: ignore[arg-type]
        for f in q35_like()
    ]


# 1. unbind never returns
def test_1_a_hung_unbind_stops_the_run_rolls_back_and_never_hands_off(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(hanging(NIC, remove_hangs=True))
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path), "-v", "exec", "--kexec", str(kexec), "--unbind-timeout", HANG_S
    )
    assert result.exit_code == ExitCode.HUNG
    stopped = f"unbind of {NIC}: e1000e remove() did not return within {HANG_S} s"
    assert f"stopped: {stopped}" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert sim.driver_of(NVME_PF) == "nvme"  # torn down earlier in the run, then rolled back
    # -v: the teardown's log line says why it stopped, for a journal read after the fact.
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    (torn_down,) = [event for event in logged if event["event"] == "torn down"]
    assert torn_down["stopped"].startswith(stopped)


# 2. unbind answers EBUSY / ENODEV / EINVAL
@pytest.mark.parametrize("code", [errno.EBUSY, errno.ENODEV, errno.EINVAL])
def test_2_an_unbind_the_kernel_refuses_is_a_failed_step_and_the_rest_goes_on(
    make_sim: SimFactory, tmp_path: Path, code: int
) -> None:
    sim = make_sim()
    sim.fail_write(NIC, "unbind", code)
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    report = json.loads(result.stdout)
    assert report["summary"]["failed"] == [NIC]
    step = next(s for s in report["steps"] if s["bdf"] == NIC)
    assert step["detail"].startswith(
        f"still bound to e1000e after unbind ({errno.errorcode[code]})"
    )
    assert step["driver_after"] == "e1000e"  # how the step left it, for whoever reads --json
    assert sim.driver_of(NIC) == "e1000e"
    assert sim.attribute(NIC, "driver_override") == "(null)"  # put back as it was
    assert sim.driver_of("0000:03:00.0") is None  # the others were torn down


# 3. a device vanishes mid-walk
def test_3_a_function_that_vanishes_after_planning_is_reported_gone(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    env = environment(sim, tmp_path)
    topology = sim.topology()

    def discover_then_lose_one() -> object:
        sim.vanish("0000:03:00.0")  # hot-removed between discovery and its step
        return topology

    env.discover = discover_then_lose_one  # type: ignore[assignment]
    result = invoke(env, "teardown", "--json")
    assert result.exit_code == ExitCode.OK
    assert json.loads(result.stdout)["summary"]["gone"] == ["0000:03:00.0"]


def test_3_a_function_that_vanishes_during_discovery_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", q35_like())
    (sim.device_dir("0000:03:00.0").resolve() / "vendor").unlink()  # half gone
    (sim.root / "bus" / "pci" / "devices" / "0000:00:09.0").symlink_to("../../../devices/gone")
    topology = discover_without_libudev(sim, monkeypatch)
    assert Bdf.parse("0000:03:00.0") not in topology.functions
    assert len(topology) == len(q35_like()) - 1


def discover_without_libudev(sim: SimKernel, monkeypatch: pytest.MonkeyPatch) -> Topology:
    """Discovery where libudev cannot be loaded reads the simulated tree itself."""
    monkeypatch.setattr(discovery, "udev_context", lambda: None)
    return discovery.discover_topology(sim.root)


# 4. config write EPERM (integrity lockdown)
def test_4_under_lockdown_driverless_functions_are_cleared_through_enable(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(lockdown="integrity")
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    report = json.loads(result.stdout)
    assert "0000:00:02.3" in report["summary"]["bus_master_cleared"]  # driverless bridge
    assert report["summary"]["failed"] == ["0000:00:1f.0"]  # lpc_ich: bound, cannot unbind
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    assert not sim.bus_master_on("0000:00:02.3")


def test_4_an_enable_count_above_one_is_dropped_to_zero_and_restored(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim([SimFunction("0000:00:05.0", enable_count=3)], lockdown="integrity")
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert "count 3 → 0" in result.stderr
    assert "rollback: enable 0000:00:05.0 again (count 3): ok" in result.stderr
    assert sim.attribute("0000:00:05.0", "enable") == "3"


# 5. config reads all-ones
def test_5_a_function_reading_all_ones_at_its_step_is_reported_gone_not_failed(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    env = environment(sim, tmp_path)
    topology = sim.topology()
    assert topology.functions[Bdf.parse(ISA_BRIDGE)].bus_master_on  # planned: clear-bus-master

    def discover_then_freeze_one() -> object:
        sim.make_config_read_ffff(ISA_BRIDGE)  # link down or EEH-frozen after discovery
        return topology

    env.discover = discover_then_freeze_one  # type: ignore[assignment]
    result = invoke(env, "teardown", "--json")
    assert result.exit_code == ExitCode.OK
    report = json.loads(result.stdout)
    assert report["summary"]["gone"] == [ISA_BRIDGE]
    assert report["summary"]["failed"] == []
    step = next(s for s in report["steps"] if s["bdf"] == ISA_BRIDGE)
    assert (step["action"], step["status"]) == ("clear-bus-master", "gone")
    assert step["detail"] == "config reads 0xffff (gone, link down or frozen)"
    assert not any(w["path"].endswith(f"{ISA_BRIDGE}/config") for w in sim.writes())


def test_5_a_function_reading_all_ones_at_discovery_is_skipped_untouched(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    sim.make_config_read_ffff(ISA_BRIDGE)
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    assert result.exit_code == ExitCode.OK
    report = json.loads(result.stdout)
    assert ISA_BRIDGE in report["summary"]["skipped"]
    assert report["summary"]["failed"] == report["summary"]["gone"] == []
    step = next(s for s in report["steps"] if s["bdf"] == ISA_BRIDGE)
    assert (step["action"], step["status"]) == ("skip", "held")
    assert step["detail"] == "lpc_ich cannot be unbound, config space unreadable"
    assert not any(w["path"].endswith(f"{ISA_BRIDGE}/config") for w in sim.writes())


# 6. no kernel loaded
def test_6_no_kernel_loaded_refuses_before_touching_anything(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert sim.writes() == []


# 7. kexec fails, returns, or cannot be executed
@pytest.mark.parametrize("how", ["fails", "returns", "cannot-execute"])
def test_7_a_handoff_that_does_not_happen_is_rolled_back(
    make_sim: SimFactory, tmp_path: Path, how: str
) -> None:
    sim = make_sim()
    before = bound(sim)
    if how == "cannot-execute":
        kexec = tmp_path / "kexec"
        kexec.write_bytes(b"\x7fELF not really")  # executable bit, but exec() says ENOEXEC
        kexec.chmod(0o755)
    else:
        kexec = shell_script(tmp_path / "kexec", f"exit {1 if how == 'fails' else 0}\n")
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert "handoff failed" in result.stderr
    assert bound(sim) == before


# 8. SIGINT/SIGTERM mid-teardown
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_8_a_signal_mid_teardown_stops_rolls_back_and_exits_130(
    make_sim: SimFactory, tmp_path: Path, signum: signal.Signals
) -> None:
    sim = make_sim(hanging(NIC, remove_seconds=0.5))
    before = bound(sim)
    kexec = fake_kexec(tmp_path, sim)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signum))
    timer.start()
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--jobs", "1")
    timer.cancel()  # a run that ended before the signal fails below, not pytest's own run
    timer.join()
    assert result.exit_code == ExitCode.INTERRUPTED
    assert f"interrupted by {signum.name}" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    assert bound(sim) == before


# 9. a rebind during rollback fails or hangs
@pytest.mark.parametrize("fault", ["fails", "hangs"])
def test_9_a_rebind_that_fails_or_hangs_is_reported_and_the_rollback_goes_on(
    make_sim: SimFactory, tmp_path: Path, fault: str
) -> None:
    functions = hanging(NIC, probe_hangs=True) if fault == "hangs" else q35_like()
    sim = make_sim(functions)
    if fault == "fails":
        sim.fail_write(NIC, "bind", errno.EINVAL)
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--unbind-timeout", HANG_S
    )
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    line = next(x for x in result.stderr.splitlines() if f"rebind {NIC} to e1000e" in x)
    assert (f"no answer within {HANG_S} s" if fault == "hangs" else "EINVAL") in line
    assert sim.driver_of(NVME_PF) == "nvme"  # the others came back


# 10. a reset refused (ENOTTY/EAGAIN) or never returning
@pytest.mark.parametrize("code", [errno.ENOTTY, errno.EAGAIN])
def test_10_a_refused_reset_fails_its_step_and_exec_still_hands_off(
    make_sim: SimFactory, tmp_path: Path, code: int
) -> None:
    sim = make_sim()
    sim.fail_write("0000:00:02.1", "reset_subordinate", code)
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(environment(sim, tmp_path), "exec", "--hot-reset", "--kexec", str(kexec))
    assert f"reset_subordinate refused: {errno.errorcode[code]}" in result.stderr
    assert (tmp_path / "kexec-args").exists()  # a failed step is not a hang
    assert result.exit_code == ExitCode.HANDOFF_FAILED  # the stand-in kexec returns


def test_10_a_reset_that_never_returns_blocks_the_handoff_like_a_hung_unbind(
    tmp_path: Path,
) -> None:
    functions = [
        root_port("0000:00:02.0", reset_subordinate=True, reset_seconds=3600),
        SimFunction("0000:01:00.0", parent="0000:00:02.0", driver="e1000e"),
    ]
    sim = SimKernel(tmp_path / "sys", functions)
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path),
        "exec",
        "--hot-reset",
        "--reset-timeout",
        "0.5",
        "--unbind-timeout",
        "1",
        "--kexec",
        str(kexec),
    )
    assert result.exit_code == ExitCode.HUNG
    assert "reset_subordinate: no answer within 0.5 s" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
    # The stuck reset still holds config access and the device lock of everything below
    # (pci_bus_trylock()): the rollback's config write (pci_wait_cfg()) and driver_override
    # write (driver_set_override()) wait on them in children with a deadline, never in
    # petitkexec itself; the bridge above comes back.
    assert "rollback: restore COMMAND 0x0006 on 0000:01:00.0: COMMAND: ETIMEDOUT" in result.stderr
    assert "rollback: rebind 0000:01:00.0 to e1000e: driver_override: ETIMEDOUT" in result.stderr
    assert "rollback: rebind 0000:00:02.0 to pcieport: ok" in result.stderr


# 11. malformed config file, unknown keys, bad specs
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("exclude = [nvme\n", "is not valid TOML"),
        ("exlude = []\n", "has unknown key 'exlude'"),
        ('only = ["zz:zz"]\n', "only: 'zz:zz' is not a device spec"),
        ('unbind-timeout = "soon"\n', "unbind-timeout: 'soon' must be a number"),
    ],
)
def test_11_a_bad_config_file_is_one_line_and_exit_2_before_anything_is_touched(
    make_sim: SimFactory, tmp_path: Path, text: str, problem: str
) -> None:
    sim = make_sim()
    config = tmp_path / "c.toml"
    config.write_text(text)
    result = invoke(environment(sim, tmp_path), "teardown", "--config", str(config))
    assert result.exit_code == ExitCode.USAGE
    assert problem in result.stderr.splitlines()[0]
    assert sim.writes() == []


def test_11_a_config_file_others_could_write_is_refused_when_root(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    config = tmp_path / "c.toml"
    config.write_text('unprotect = ["nvme"]\n')
    config.chmod(0o666)
    result = invoke(environment(sim, tmp_path), "teardown", "--config", str(config))
    assert result.exit_code == ExitCode.USAGE
    assert "may be written by others than root" in result.stderr
    assert sim.writes() == []


# 12. not root
def test_12_not_root_refuses_a_teardown_but_not_a_dry_run(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    kexec = str(fake_kexec(tmp_path, sim))
    refused = invoke(environment(sim, tmp_path, euid=1000), "exec", "--kexec", kexec)
    assert refused.exit_code == ExitCode.PREFLIGHT_REFUSED and "not root" in refused.stderr
    dry = invoke(environment(sim, tmp_path, euid=1000), "exec", "--dry-run", "--kexec", kexec)
    assert dry.exit_code == ExitCode.OK
    assert sim.writes() == []


# 13. /sys missing or not sysfs
def test_13_a_missing_sysfs_is_a_clear_refusal(tmp_path: Path) -> None:
    env = Environment(sysfs_root=tmp_path / "nosys", proc_root=tmp_path, euid=0)
    result = invoke(env, "plan")
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert result.stderr.splitlines()[0].startswith(f"petitkexec: {tmp_path}/nosys/bus/pci is")
    assert "Traceback" not in result.stderr


def test_13_a_write_whose_path_leads_outside_sysfs_is_refused(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    outside = tmp_path / "outside"
    outside.write_text("")
    override = sim.device_dir(NIC).resolve() / "driver_override"
    override.unlink()
    override.symlink_to(outside)
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    step = next(s for s in json.loads(result.stdout)["steps"] if s["bdf"] == NIC)
    assert step["status"] == "failed" and "EXDEV" in step["detail"]
    assert outside.read_text() == ""
    assert sim.driver_of(NIC) == "e1000e"


# 14. storage behind a rw mount: protected
def test_14_the_disk_behind_a_writable_mount_is_protected_and_a_read_only_one_is_not(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    # Neither is the root file system (protected whatever its mode): the rw decision itself.
    sim = make_sim()
    block = sim.root / "dev" / "block"
    block.mkdir(parents=True)
    for number, disk in [
        ("259:0", sim.device_dir(NVME_PF).resolve() / "nvme" / "nvme0" / "nvme0n1"),
        ("8:0", sim.device_dir(AHCI).resolve() / "ata1" / "host0" / "block" / "sda"),
    ]:
        disk.mkdir(parents=True)
        (block / number).symlink_to(disk)
    env = environment(sim, tmp_path)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        "22 1 259:0 / /srv rw,relatime shared:1 - ext4 /dev/nvme0n1 rw\n"
        "23 1 8:0 / /mnt/backup ro,relatime shared:2 - ext4 /dev/sda ro\n"
    )
    result = invoke(env, "teardown", "--json")
    assert result.exit_code == ExitCode.OK
    report = json.loads(result.stdout)
    assert report["summary"]["protected"] == [NVME_PF, "0000:00:02.0"]  # with its root port
    step = next(s for s in report["steps"] if s["bdf"] == NVME_PF)
    assert step["detail"] == "backs /srv mounted rw"
    assert sim.driver_of(NVME_PF) == "nvme"
    assert AHCI in report["summary"]["unbound"]  # mounted read-only: nothing to lose
    assert sim.driver_of(AHCI) is None


# 15. BME still on / back on after unbind
def test_15_bus_master_a_driver_leaves_on_is_cleared_after_the_unbind(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    report = json.loads(result.stdout)
    step = next(s for s in report["steps"] if s["bdf"] == NIC)
    assert "driver left bus master on" in step["detail"]
    assert not sim.bus_master_on(NIC)


# 16. no libudev lookup possible
def test_16_without_libudev_discovery_reads_sysfs_into_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = SimKernel(tmp_path / "sys", q35_like())
    assert discover_without_libudev(sim, monkeypatch) == sim.topology()


def test_16_libudev_is_loaded_by_soname_without_ldconfig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda _name: None)  # no ldconfig
    assert discovery.udev_context() is not None


# 17. bare environment, no PATH
def test_17_kexec_is_never_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell_script(tmp_path / "kexec", "exit 0\n")
    monkeypatch.chdir(tmp_path)
    for path in ("", ":", ".", "bin:.", f":{tmp_path}/nothing"):
        found = find_kexec(None, path)
        assert found is None or (os.path.isabs(found) and found != str(tmp_path / "kexec"))
    assert find_kexec("kexec") == str(tmp_path / "kexec")  # asked for explicitly: made absolute


def test_17_an_unexpected_error_after_the_teardown_began_rolls_back_and_exits_70(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_handoff(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", "kexec")

    monkeypatch.setattr(petitkexec.run, "execute_loaded_kernel", broken_handoff)
    sim = make_sim()
    before = bound(sim)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.INTERNAL
    assert "petitkexec: unexpected FileNotFoundError" in result.stderr
    assert "rolled back" in result.stderr and "Traceback" not in result.stderr
    assert bound(sim) == before


# 18. SR-IOV PF with VFs, handoff fails: the VFs come back
def test_18_a_failed_handoff_brings_the_vfs_back_with_their_drivers(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert f"rollback: restore 2 VFs on {NVME_PF}: ok" in result.stderr
    assert sim.driver_of("0000:01:00.1") == "nvme" and sim.driver_of("0000:01:00.2") == "nvme"


# The systemd hook's bounds: a whole run inside --time-limit, and nothing undone with
# --no-rollback (systemd hands off regardless once it gave up on the hook).
def test_a_time_limit_bounds_the_whole_run_and_no_rollback_leaves_it_as_it_is(
    tmp_path: Path,
) -> None:
    functions = [
        SimFunction(f"0000:00:{slot:02x}.0", driver="e1000e", remove_seconds=0.4)
        for slot in range(2, 8)
    ]
    sim = SimKernel(tmp_path / "sys", functions)
    began = time.monotonic()
    result = invoke(
        environment(sim, tmp_path),
        "teardown",
        "--jobs",
        "1",
        "--time-limit",
        "1",
        "--no-rollback",
        "--json",
    )
    elapsed = time.monotonic() - began
    report = json.loads(result.stdout)
    # The unbind in flight when the limit ran out still holds its device_lock: hung.
    assert result.exit_code == ExitCode.HUNG
    assert "remove() still running when the time limit ran out" in report["stopped_because"]
    assert elapsed < 2.0  # the limit, plus start-up
    unbound = report["summary"]["unbound"]
    assert 1 <= len(unbound) < len(functions) and report["rollback"] == []
    assert all(sim.driver_of(bdf) is None for bdf in unbound)  # not rolled back


# A write to `unbind` that has not returned holds device_lock whatever brought its deadline:
# cut short by --time-limit, it blocks the handoff like a hung one (device_shutdown() at kexec
# would wait on that lock forever).
def test_a_step_cut_short_by_the_time_limit_is_hung_and_blocks_the_handoff(
    tmp_path: Path,
) -> None:
    slow = SimFunction("0000:00:02.0", driver="e1000e", remove_hangs=True)
    sim = SimKernel(tmp_path / "sys", [slow])
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(
        environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--time-limit", "0.5"
    )
    assert result.exit_code == ExitCode.HUNG
    assert "remove() still running when the time limit ran out (after 0.5 s" in result.stderr
    assert "no handoff" in result.stderr
    assert not (tmp_path / "kexec-args").exists()
