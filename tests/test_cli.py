"""The command line, driven through click's CliRunner against a simulated kernel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from petitkexec.cli import cli
from petitkexec.environment import Environment
from petitkexec.errors import ExitCode
from tests.clirun import environment, fake_kexec, invoke, runner, shell_script
from tests.conftest import SimFactory


def test_plan_prints_a_tree_with_every_function_and_its_action(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "plan")
    assert result.exit_code == 0
    for function in sim.functions:
        assert function.bdf in result.stdout
    assert "├─ 0000:00:02.0 1b36:000c class 060400 driver pcieport [bridge]" in result.stdout
    assert (
        "│  ├─ 0000:01:00.0 1b36:0010 class 010802 driver nvme [multi-function]  →  "
        "unbind (nvme, has unbind)" in result.stdout
    )
    assert "clear-bus-master (no driver, BME on)" in result.stdout
    assert "16 functions:" in result.stdout


def test_plan_json_lists_steps_in_execution_order_and_logs_stay_off_stdout(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "-v", "plan", "--json")
    data = json.loads(result.stdout)
    bdfs = [step["bdf"] for step in data["steps"]]
    assert sorted(bdfs) == sorted(f.bdf for f in sim.functions)
    assert bdfs.index("0000:01:00.1") < bdfs.index("0000:01:00.0") < bdfs.index("0000:00:02.0")
    assert {"bdf", "action", "reason"} <= set(data["steps"][0])


def test_plan_exclude_keeps_matching_functions(make_sim: SimFactory, tmp_path: Path) -> None:
    result = invoke(environment(make_sim(), tmp_path), "plan", "--exclude", "0000:00:1f.*")
    assert "keep (excluded by --exclude 0000:00:1f.*)" in result.stdout


@pytest.mark.parametrize(
    ("option", "value"),
    [("--exclude", "0000:zz:00.0"), ("--only", "80861:10d3"), ("--unprotect", "class:xyz")],
)
def test_bad_spec_is_one_line_naming_option_and_value_with_exit_2(
    make_sim: SimFactory, tmp_path: Path, option: str, value: str
) -> None:
    result = invoke(environment(make_sim(), tmp_path), "plan", option, value)
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.splitlines()[0].startswith(f"petitkexec: {option}: {value!r} ")
    assert result.stdout == ""


def test_config_file_excludes_like_the_option(make_sim: SimFactory, tmp_path: Path) -> None:
    config = tmp_path / "petitkexec.toml"
    config.write_text('exclude = ["ahci"]\nhot-reset = true\n')
    result = invoke(environment(make_sim(), tmp_path), "plan", "--config", str(config))
    assert "keep (excluded by --exclude ahci)" in result.stdout
    assert "reset-bus (bridge, --hot-reset)" in result.stdout


def test_a_snapshot_that_cannot_be_written_is_a_usage_error_naming_the_file(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """The Ansible role met this: `snapshot -o` into a directory not made yet."""
    output = tmp_path / "not-made-yet" / "before.json"
    result = invoke(environment(make_sim(), tmp_path), "snapshot", "-o", str(output))
    assert result.exit_code == ExitCode.USAGE, result.stderr
    assert f"--output: '{output}' cannot be written (No such file or directory)" in result.stderr
    assert "bug" not in result.stderr


def test_snapshot_then_plan_from_it_gives_the_same_plan(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    env = environment(make_sim(), tmp_path)
    snapshot = tmp_path / "snap.json"
    assert invoke(env, "snapshot", "-o", str(snapshot)).exit_code == 0
    live = invoke(env, "plan", "--json").stdout
    offline = invoke(
        Environment(discover=_no_discovery), "plan", "--json", "--snapshot", str(snapshot)
    ).stdout
    assert json.loads(offline)["steps"] == json.loads(live)["steps"]


def _no_discovery():  # type: ignore[no-untyped-def]
    raise AssertionError("plan --snapshot must not discover")


def test_teardown_prints_each_step_and_a_json_summary(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "teardown", "--json")
    assert result.exit_code == ExitCode.OK
    report = json.loads(result.stdout)
    assert "0000:02:00.0" in report["summary"]["unbound"]
    assert "0000:00:02.3" in report["summary"]["bus_master_cleared"]
    unbound = next(step for step in report["steps"] if step["bdf"] == "0000:02:00.0")
    assert (unbound["status"], unbound["driver_after"]) == ("done", None)
    assert re.search(r"^\[ ?\d+/16\] 0000:01:00\.1 unbind +done", result.stderr, re.M)
    assert re.search(r"^wall time \d+ ms; critical path \d+ ms \(", result.stderr, re.M)


def test_teardown_refuses_without_root_and_touches_nothing(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    result = invoke(environment(sim, tmp_path, euid=1000), "teardown")
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert "not root" in result.stderr
    assert sim.writes() == []


def test_exec_refuses_when_no_kernel_is_loaded_and_touches_nothing(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(fake_kexec(tmp_path, sim)))
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert "no kernel is loaded" in result.stderr and "hint: pass --load" in result.stderr
    assert sim.writes() == []


def test_exec_dry_run_changes_nothing_and_says_what_it_would_run(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(environment(sim, tmp_path), "exec", "--dry-run", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.OK
    assert f"dry run: would now run {kexec} -e" in result.stderr
    assert sim.writes() == []
    assert not (tmp_path / "kexec-args").exists()
    args = ["exec", "--dry-run", "--kexec", str(kexec), "--", "-f"]
    with_args = invoke(environment(sim, tmp_path), *args)
    assert f"dry run: would now run {kexec} -f -e" in with_args.stderr  # as exec_argv orders them


def test_exec_tears_down_then_runs_kexec_e_and_rolls_back_when_it_returns(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    kexec = fake_kexec(tmp_path, sim, returncode=1)
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--", "-f")
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    # kexec-tools reads options in order: `-e -f` would be a load (see handoff.exec_argv)
    assert (tmp_path / "kexec-args").read_text().split() == ["-f", "-e"]
    # at the handoff only lpc_ich (no unbind) was still bound
    assert (tmp_path / "bound-at-handoff").read_text().strip() == "1"
    assert "handoff failed" in result.stderr
    assert sim.driver_of("0000:02:00.0") == "e1000e"  # rolled back
    assert sim.driver_of("0000:01:00.0") == "nvme"
    # The last line before the handoff names what runs, as it runs; after it, no word of a
    # watchdog that --watchdog did not start.
    lines = result.stderr.splitlines()
    handing_off = [i for i, line in enumerate(lines) if line.startswith("handing off: ")]
    assert [lines[i] for i in handing_off] == [f"handing off: {kexec} -f -e"]
    assert lines[handing_off[0] + 1].startswith("handoff failed: ")
    assert not any(line.startswith("watchdog:") for line in lines)


def test_a_failed_handoff_is_reported_on_one_line_whatever_kexec_printed(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """kexec-tools follows an error with its usage text; a wrapper may print pages."""
    sim = make_sim()
    kexec = shell_script(
        tmp_path / "kexec",
        "echo 'Usage: kexec [OPTIONS]'; echo '  -e  Execute'\n"
        "echo >&2; echo 'No kernel specified' >&2; echo 'more' >&2; exit 1\n",
    )
    result = invoke(environment(sim, tmp_path), "exec", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    failed = [line for line in result.stderr.splitlines() if "handoff failed" in line]
    assert failed == [f"handoff failed: {kexec} -e returned 1: No kernel specified"]
    assert "Usage" not in result.stderr and "more" not in result.stderr


def test_exec_strict_does_not_hand_off_after_a_failed_step(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(lockdown="integrity")  # lpc_ich's bus master cannot be cleared
    kexec = fake_kexec(tmp_path, sim)
    result = invoke(environment(sim, tmp_path), "exec", "--strict", "--kexec", str(kexec))
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    assert not (tmp_path / "kexec-args").exists()


def test_help_documents_the_exit_codes() -> None:
    result = runner().invoke(cli, ["exec", "--help"])
    assert "3    preflight refused: nothing was touched" in result.stdout
    assert "5    a step hung (an unbind or a reset): no handoff" in result.stdout
    assert "70   an unexpected error" in result.stdout


def scripted_kexec(tmp_path: Path, load_rc: int, exec_rc: int) -> Path:
    """A kexec stand-in: `-l ...` answers load_rc, `-e` answers exec_rc."""
    return shell_script(
        tmp_path / "kexec-scripted",
        f'echo "$@" >> {tmp_path}/kexec-calls\n'
        f'if [ "$1" = -l ]; then echo "cannot load: bad image" >&2; exit {load_rc}; fi\n'
        f"exit {exec_rc}\n",
    )


def test_exec_load_failure_refuses_with_kexecs_words_and_touches_nothing(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not a kernel")
    kexec = scripted_kexec(tmp_path, load_rc=1, exec_rc=1)
    result = invoke(
        environment(sim, tmp_path),
        "exec",
        "--kexec",
        str(kexec),
        "--load",
        str(kernel),
        "--append",
        "console=ttyS0",
    )
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert "kexec load failed (1): cannot load: bad image" in result.stderr
    assert f"hint: nothing was touched; {kexec} -l {kernel} --append=console=ttyS0" in (
        result.stderr
    )
    assert (tmp_path / "kexec-calls").read_text().split() == [
        "-l",
        str(kernel),
        "--append=console=ttyS0",
    ]
    assert sim.writes() == []


def test_exec_loads_with_s_under_lockdown_then_tears_down(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False, lockdown="integrity")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    kexec = scripted_kexec(tmp_path, load_rc=0, exec_rc=1)
    result = invoke(
        environment(sim, tmp_path),
        "exec",
        "--kexec",
        str(kexec),
        "--load",
        str(kernel),
        "--reuse-cmdline",
    )
    calls = (tmp_path / "kexec-calls").read_text().splitlines()
    assert calls == [f"-l {kernel} -s --reuse-cmdline", "-e"]  # kexec_load is refused
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert "rollback: rebind 0000:02:00.0 to e1000e: ok" in result.stderr


def test_exec_without_a_kexec_binary_refuses_unless_syscall(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import petitkexec.handoff

    monkeypatch.setattr(petitkexec.handoff, "find_kexec", lambda _explicit, _path=None: None)
    sim = make_sim()
    result = invoke(environment(sim, tmp_path), "exec")
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert "no kexec binary found" in result.stderr and "--syscall" in result.stderr
    assert sim.writes() == []
    dry = invoke(environment(sim, tmp_path), "exec", "--syscall", "--dry-run")
    assert dry.exit_code == ExitCode.OK
    assert "would now run reboot(LINUX_REBOOT_CMD_KEXEC)" in dry.stderr


def test_next_kernel_reset_phbs_adds_the_parameter_to_the_reused_command_line(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False)
    env = environment(sim, tmp_path)
    (tmp_path / "proc" / "cmdline").write_text("root=/dev/sda2 console=hvc0\n")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    kexec = scripted_kexec(tmp_path, load_rc=0, exec_rc=1)
    args = ["exec", "--kexec", str(kexec), "--load", str(kernel)]
    invoke(env, *args, "--reuse-cmdline", "--next-kernel-reset-phbs")
    invoke(env, *args, "--append", "quiet", "--next-kernel-reset-phbs")
    loads = [c for c in (tmp_path / "kexec-calls").read_text().splitlines() if c.startswith("-l")]
    assert loads == [
        f"-l {kernel} --append=root=/dev/sda2 console=hvc0 ppc_pci_reset_phbs",
        f"-l {kernel} --append=quiet ppc_pci_reset_phbs",
    ]


def test_verbose_logs_each_phase_with_what_it_found_as_json_lines(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(lockdown="integrity")  # lpc_ich's bus master cannot be cleared: one failure
    result = invoke(environment(sim, tmp_path), "-v", "teardown")
    assert result.exit_code == ExitCode.TEARDOWN_PARTIAL
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    events = {event["event"]: event for event in logged}
    assert {key: events["discovered"][key] for key in ("functions", "needed", "lockdown")} == {
        "functions": 16,
        "needed": 0,
        "lockdown": "integrity",
    }
    assert {key: events["planned"][key] for key in ("steps", "waves")} == {"steps": 16, "waves": 3}
    torn_down = events["torn down"]
    assert (torn_down["dry_run"], torn_down["failed"], torn_down["stopped"]) == (False, 1, None)
    result = invoke(environment(sim, tmp_path), "-v", "teardown", "--dry-run")
    dry = [json.loads(line) for line in result.stderr.splitlines() if '"torn down"' in line]
    assert [(e["dry_run"], e["failed"]) for e in dry] == [(True, 0)]


def test_exec_dry_run_neither_loads_nor_needs_root(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = make_sim(kexec_loaded=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    kexec = scripted_kexec(tmp_path, load_rc=0, exec_rc=1)
    args = ["exec", "--dry-run", "--json", "--kexec", str(kexec), "--load", str(kernel)]
    result = invoke(environment(sim, tmp_path, euid=1000), *args)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert f"dry run: would now run {kexec} -e" in result.stderr
    report = json.loads(result.stdout)
    assert report["handoff"] == "not attempted (dry run)"
    nic = next(step for step in report["steps"] if step["bdf"] == "0000:02:00.0")
    # a dry run reports each function as it is, bound and bus mastering
    assert (nic["status"], nic["driver_after"], nic["command_after"]) == ("would", "e1000e", "0006")
    assert not (tmp_path / "kexec-calls").exists()  # `kexec -l` replaces a loaded image
    assert sim.writes() == []
