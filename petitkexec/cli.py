"""The command line: parse, set up logging, call discovery → plan → teardown → handoff.

Exit codes: 0 done; 1 teardown partially failed; 2 usage error; 3 preflight refused (nothing
touched); 4 handoff failed (teardown rolled back); 5 an unbind hung (no handoff; the machine
needs a reboot); 130 interrupted (rolled back).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from petitkexec.errors import ExitCode, PetitkexecError, PreflightRefused, UsageError
from petitkexec.execute import DEFAULT_JOBS, ExecutionOptions, StepOutcome, Teardown, TeardownReport
from petitkexec.facts import gather_facts
from petitkexec.handoff import LoadRequest, execute_loaded_kernel, find_kexec, load
from petitkexec.kernel import SYSFS_ROOT, Kernel, RealSysfsWriter, SysfsWriter
from petitkexec.log import configure_logging, get_logger, timed
from petitkexec.model import SystemFacts, Topology
from petitkexec.plan import Plan, build_plan
from petitkexec.policy import Policy, load_config
from petitkexec.preflight import PreflightInput, check_can_hand_off, check_can_tear_down
from petitkexec.render import (
    facts_line,
    facts_to_json,
    outcome_line,
    plan_summary,
    plan_to_json,
    plan_tree,
    report_lines,
    report_to_json,
    rollback_lines,
    rollback_to_json,
)
from petitkexec.snapshot import load_snapshot, snapshot_to_json

EXIT_CODES_HELP = """\b
Exit codes:
  0    done
  1    teardown partially failed (see the report)
  2    usage error: a bad option, device spec or config file
  3    preflight refused: nothing was touched
  4    handoff failed: kexec did not take over; the teardown was rolled back
  5    an unbind hung: no handoff (the kernel's own shutdown would hang too)
  130  interrupted by SIGINT/SIGTERM: rolled back"""


def _discover_with_udev() -> Topology:
    from petitkexec.discovery import discover_topology  # pyudev loads only when discovering

    return discover_topology()


@dataclass
class Environment:
    """What the commands act on; tests hand in a simulated kernel through click's `obj`."""

    sysfs_root: Path = SYSFS_ROOT
    proc_root: Path = Path("/proc")
    discover: Callable[[], Topology] = _discover_with_udev
    writer: SysfsWriter = field(default_factory=RealSysfsWriter)
    euid: int = field(default_factory=os.geteuid)

    def kernel(self) -> Kernel:
        return Kernel(self.sysfs_root, self.writer)

    def facts(self) -> SystemFacts:
        return gather_facts(self.sysfs_root, self.proc_root)


F = TypeVar("F", bound=Callable[..., Any])


def policy_options(command: F) -> F:
    """The options every planning command shares; the config file takes the same keys."""
    decorators = [
        click.option(
            "--exclude",
            multiple=True,
            metavar="SPEC",
            help="Leave matching functions alone: BDF glob, vendor:device, class:HEX or "
            "driver name. Repeatable.",
        ),
        click.option(
            "--only",
            multiple=True,
            metavar="SPEC",
            help="Touch only matching functions (same syntax). Repeatable.",
        ),
        click.option(
            "--unprotect",
            multiple=True,
            metavar="SPEC",
            help="Tear down matching functions even if the running system needs them "
            "(the root disk, a mounted share, the console).",
        ),
        click.option(
            "--hot-reset",
            is_flag=True,
            help="Add a secondary-bus reset of each fully torn-down bridge, last.",
        ),
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path),
            help="TOML config file [default: /etc/petitkexec.toml if present].",
        ),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def execution_options(command: F) -> F:
    decorators = [
        click.option("--dry-run", is_flag=True, help="Print what would run; change nothing."),
        click.option(
            "--unbind-timeout",
            type=click.FloatRange(min=0.1),
            default=None,
            metavar="SECONDS",
            help="Deadline for each driver unbind [default: 5].",
        ),
        click.option(
            "--jobs",
            type=click.IntRange(min=1),
            default=DEFAULT_JOBS,
            show_default=True,
            help="Unbind up to this many independent devices side by side (1: one at a time).",
        ),
        click.option(
            "--raw-sbr",
            is_flag=True,
            help="Allow a raw secondary-bus reset through Bridge Control when the kernel "
            "offers no reset (never on PowerNV).",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


class _Group(click.Group):
    """Turns our exceptions into a one-line message, a hint and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PetitkexecError as error:
            if ctx.meta.get("debug"):
                traceback.print_exc()
            _echo_err(f"petitkexec: {error}")
            if error.hint:
                _echo_err(f"hint: {error.hint}")
            sys.exit(error.exit_code)


@click.group(
    cls=_Group, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress (stderr).")
@click.option("--debug", is_flag=True, help="Debug logs, and a traceback on errors.")
@click.version_option(package_name="petitkexec")
@click.pass_context
def cli(context: click.Context, verbose: bool, debug: bool) -> None:
    """Quiesce PCI devices the way remove() does, then hand off to kexec."""
    configure_logging(verbose=verbose, debug=debug)
    context.ensure_object(Environment)
    context.meta["debug"] = debug


def _environment() -> Environment:
    environment = click.get_current_context().find_object(Environment)
    assert environment is not None
    return environment


def _policy(shared: dict[str, Any], config: dict[str, object]) -> Policy:
    return Policy.from_options(
        exclude=shared["exclude"],
        only=shared["only"],
        unprotect=shared["unprotect"],
        hot_reset=shared["hot_reset"],
        config=config,
    )


def _unbind_timeout(option: float | None, config: dict[str, object]) -> float:
    value = config.get("unbind-timeout", ExecutionOptions.unbind_timeout_s)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise UsageError("config key unbind-timeout", repr(value), "must be a positive number")
    return float(value) if option is None else option


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@policy_options
@click.option(
    "--snapshot",
    "snapshot_path",
    type=click.Path(path_type=Path),
    help="Plan from a `petitkexec snapshot` file instead of this machine.",
)
def plan(snapshot_path: Path | None, **shared: Any) -> None:
    """Show what a teardown would do to every PCI function. Changes nothing."""
    policy = _policy(shared, load_config(shared["config_path"]))
    environment = _environment()
    if snapshot_path is not None:
        topology, facts = load_snapshot(snapshot_path)
    else:
        topology, facts = environment.discover(), environment.facts()
    the_plan = build_plan(topology, policy, facts)
    if shared["as_json"]:
        payload = {**plan_to_json(topology, the_plan), "facts": facts_to_json(facts)}
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(plan_tree(topology, the_plan))
    click.echo(f"\n{len(topology)} functions: {plan_summary(the_plan)}")
    click.echo(facts_line(facts))
    for conflict in the_plan.conflicts:
        click.echo(f"conflict: {conflict}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write here, not stdout.")
def snapshot(output: Path | None) -> None:
    """Write this machine's PCI topology and facts as JSON (for `plan --snapshot`)."""
    environment = _environment()
    text = json.dumps(snapshot_to_json(environment.discover(), environment.facts()), indent=2)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n")


def _prepare(
    shared: dict[str, Any],
) -> tuple[Environment, Topology, SystemFacts, Plan, ExecutionOptions]:
    """Config, policy, discovery and plan from the options `teardown` and `exec` share."""
    config = load_config(shared["config_path"])
    policy = _policy(shared, config)
    options = ExecutionOptions(
        unbind_timeout_s=_unbind_timeout(shared["unbind_timeout"], config),
        jobs=shared["jobs"],
        raw_sbr=shared["raw_sbr"],
        dry_run=shared["dry_run"],
    )
    environment, log = _environment(), get_logger("petitkexec")
    with timed(log, "discovered") as fields:
        topology, facts = environment.discover(), environment.facts()
        fields.update(functions=len(topology), needed=len(facts.needed), lockdown=facts.lockdown)
    with timed(log, "planned") as fields:
        the_plan = build_plan(topology, policy, facts)
        fields.update(steps=len(the_plan.steps), waves=len({s.wave for s in the_plan.steps}))
    return environment, topology, facts, the_plan, options


def _run_teardown(
    environment: Environment, topology: Topology, the_plan: Plan, options: ExecutionOptions
) -> tuple[Teardown, TeardownReport]:
    teardown = Teardown(
        environment.kernel(), topology, the_plan, options, on_outcome=_print_outcome
    )
    with timed(get_logger("petitkexec"), "torn down", dry_run=options.dry_run) as fields:
        report = teardown.run()
        fields.update(failed=len(report.failed), stopped=report.stopped_because)
    return teardown, report


def _print_outcome(index: int, total: int, outcome: StepOutcome) -> None:
    _echo_err(outcome_line(index, total, outcome))


def _print_report(
    report: TeardownReport, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    if as_json:
        click.echo(json.dumps({**report_to_json(report), **(extra or {})}, indent=2))
    for line in report_lines(report):
        _echo_err(line)


def _exit_code(report: TeardownReport) -> ExitCode:
    if report.hung:
        return ExitCode.UNBIND_HUNG
    if report.interrupted:
        return ExitCode.INTERRUPTED
    return ExitCode.TEARDOWN_PARTIAL if report.failed else ExitCode.OK


@cli.command(epilog=EXIT_CODES_HELP)
@policy_options
@execution_options
def teardown(**shared: Any) -> None:
    """Execute the plan: unbind drivers, clear bus master, optionally reset buses."""
    environment, topology, _facts, the_plan, options = _prepare(shared)
    if not options.dry_run:
        check_can_tear_down(environment.euid, the_plan)
    _teardown, report = _run_teardown(environment, topology, the_plan, options)
    _print_report(report, shared["as_json"])
    sys.exit(_exit_code(report))


@cli.command("exec", epilog=EXIT_CODES_HELP)
@policy_options
@execution_options
@click.option(
    "--load",
    "load_kernel",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Load this kernel first (kexec -l; -s under lockdown).",
)
@click.option("--initrd", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--append", help="Kernel command line for --load.")
@click.option("--reuse-cmdline", is_flag=True, help="Reuse this kernel's command line.")
@click.option("--dtb", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--kexec",
    "kexec_path",
    metavar="PATH",
    help="The kexec binary (kexec-tools or kexec-lite) [default: from PATH].",
)
@click.option(
    "--syscall",
    is_flag=True,
    help="Hand off with reboot(LINUX_REBOOT_CMD_KEXEC) instead of `kexec -e` (images without "
    "kexec-tools; --load still needs a binary).",
)
@click.option("--strict", is_flag=True, help="Do not hand off if any teardown step failed.")
@click.argument("kexec_args", nargs=-1, type=click.UNPROCESSED)
def exec_(
    load_kernel: Path | None,
    initrd: Path | None,
    append: str | None,
    reuse_cmdline: bool,
    dtb: Path | None,
    kexec_path: str | None,
    syscall: bool,
    strict: bool,
    kexec_args: tuple[str, ...],
    **shared: Any,
) -> None:
    """Preflight, optional load, teardown, then `kexec -e`. On success it never returns.

    Arguments after `--` go to `kexec -e`.
    """
    if append is not None and reuse_cmdline:
        raise UsageError("--append", append, "cannot be combined with --reuse-cmdline")
    if load_kernel is None and (initrd or append or reuse_cmdline or dtb):
        raise UsageError("--initrd/--append/--reuse-cmdline/--dtb", "", "need --load KERNEL")
    environment, topology, facts, the_plan, options = _prepare(shared)
    dry_run, as_json = options.dry_run, shared["as_json"]
    kexec = find_kexec(kexec_path)
    if kexec_path is not None and kexec is None:
        raise UsageError("--kexec", kexec_path, "is not an executable file")
    check_can_hand_off(
        PreflightInput(facts, the_plan, kexec, syscall, load_kernel is not None, environment.euid)
    )
    if load_kernel is not None and not dry_run:
        assert kexec is not None
        request = LoadRequest(
            load_kernel, initrd, append, reuse_cmdline, dtb, file_load=facts.config_writes_blocked
        )
        failure = load(request, kexec)
        if failure is not None:
            raise PreflightRefused(
                f"kexec load failed ({failure.returncode}): {failure.output}",
                hint="nothing was touched; " + " ".join(failure.command),
            )
    teardown_run, report = _run_teardown(environment, topology, the_plan, options)
    handoff_binary = None if syscall else kexec
    handoff = (
        f"{handoff_binary} -e {' '.join(kexec_args)}".strip()
        if handoff_binary
        else "reboot(LINUX_REBOOT_CMD_KEXEC)"
    )
    if dry_run or not report.handoff_safe or (strict and report.failed):
        _print_report(report, as_json, {"handoff": "not attempted"})
        if dry_run:
            _echo_err(f"dry run: would now run {handoff}")
        else:
            why = "--strict" if report.handoff_safe else "the kernel's shutdown would hang too"
            _echo_err(f"no handoff ({why})")
        sys.exit(_exit_code(report))
    _print_report(report, False)
    _echo_err(f"handing off: {handoff}")
    failure = execute_loaded_kernel(handoff_binary, kexec_args)
    # Still here: kexec refused. Put the devices back so a bootloader menu or shell works.
    _echo_err(
        f"handoff failed: {' '.join(failure.command)} returned {failure.returncode}: "
        f"{failure.output}"
    )
    rollback = teardown_run.journal.rollback(environment.kernel())
    for line in rollback_lines(rollback):
        _echo_err(line)
    if as_json:
        payload = {
            **report_to_json(report),
            "handoff": "failed",
            "handoff_error": failure.output,
            "rollback": rollback_to_json(rollback),
        }
        click.echo(json.dumps(payload, indent=2))
    sys.exit(ExitCode.HANDOFF_FAILED)


def main() -> None:
    cli()
