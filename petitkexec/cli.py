"""The command line: parse, set up logging, call petitkexec.run, print, map results to exit codes.

Every exception ends here as one line (and a hint) with a documented exit code; a traceback
only with --debug.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from petitkexec import __version__
from petitkexec.environment import Environment
from petitkexec.errors import (
    INTERNAL_HINT,
    ExitCode,
    PetitkexecError,
    PreflightRefused,
    RolledBack,
    UsageError,
    describe_exception,
)
from petitkexec.log import configure_logging
from petitkexec.settings import SETTINGS, Scope, Settings, load_config, resolve

# Everything else is imported by the command that needs it: `plan --snapshot` never loads
# pyudev or the executor, and --help loads neither; `plan` loads json only to read a snapshot
# or print JSON, traceback only with --debug.
if TYPE_CHECKING:
    from petitkexec.outcome import StepOutcome, TeardownReport
    from petitkexec.run import ExecResult, HandoffRequest
    from petitkexec.watchdog import Watchdog

EXIT_CODES_HELP = """\b
Exit codes:
  0    done
  1    teardown partially failed (see the report)
  2    usage error: a bad option, device spec or config file
  3    preflight refused: nothing was touched
  4    handoff failed: kexec did not take over; the teardown was rolled back
  5    a step hung (an unbind or a reset): no handoff (the kernel's own shutdown would hang too)
  6    verify: a function did not come back as it was
  70   an unexpected error (a bug); the teardown, if begun, was rolled back
  130  interrupted by SIGINT/SIGTERM/SIGHUP/SIGQUIT: rolled back, no handoff"""

F = TypeVar("F", bound=Callable[..., Any])


def setting_options(*scopes: Scope) -> Callable[[F], F]:
    """The click options of every setting in `scopes`, derived from petitkexec.settings.
    Values arrive unparsed (None when not given): settings.resolve reads them, like the
    config file's."""

    def decorate(command: F) -> F:
        command = report_options(*scopes)(command)
        command = click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path, dir_okay=False),
            help="TOML config file with the same keys [default: /etc/petitkexec.toml if present].",
        )(command)
        return click.option(
            "--json", "as_json", is_flag=True, help="Machine-readable output on stdout."
        )(command)

    return decorate


def report_options(*scopes: Scope) -> Callable[[F], F]:
    """Only the settings' own click options (no --config, no --json), for commands such as
    verify that take a setting or two but plan nothing."""

    def decorate(command: F) -> F:
        for setting in reversed([s for s in SETTINGS if s.scope in scopes]):
            if setting.flag:
                option = click.option(setting.option, setting.name, is_flag=True, help=setting.help)
            else:
                option = click.option(
                    setting.option,
                    setting.name,
                    multiple=setting.multiple,
                    default=None,
                    metavar=setting.metavar,
                    help=setting.help_text,
                )
            command = option(command)
        return command

    return decorate


class _Group(click.Group):
    """One error policy: every exception is a one-line message, a hint and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BaseException as error:
            if isinstance(error, SystemExit):
                raise
            _die(error, debug=bool(ctx.meta.get("debug")))


def _die(error: BaseException, *, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(error)
    if isinstance(error, RolledBack):
        from petitkexec.render import rollback_lines

        for line in rollback_lines(error.rollback):
            _echo_err(line)
    _echo_err(f"petitkexec: {describe_exception(error)}")
    if isinstance(error, PetitkexecError):
        hint, code = error.hint, error.exit_code
    elif isinstance(error, KeyboardInterrupt):
        hint, code = None, ExitCode.INTERRUPTED
    else:
        hint, code = INTERNAL_HINT, ExitCode.INTERNAL
    if hint:
        _echo_err(f"hint: {hint}")
    sys.exit(code)


@click.group(
    cls=_Group, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress (stderr).")
@click.option("--debug", is_flag=True, help="Debug logs, and a traceback on errors.")
@click.version_option(version=__version__, package_name="petitkexec")
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


def _settings(given: dict[str, Any]) -> Settings:
    config, source = load_config(given.pop("config_path"), _environment().euid)
    return resolve(given, config, source)


def _echo_err(text: str) -> None:
    click.echo(text, err=True)


def _print_json(payload: dict[str, Any]) -> None:
    """One line, for programs (`| jq` for people): indenting would take the json module off
    its C encoder, three times the time on a 10k-function plan."""
    import json

    click.echo(json.dumps(payload))


@cli.command(epilog=EXIT_CODES_HELP)
@setting_options(Scope.PLAN)
@click.option(
    "--snapshot",
    "snapshot_path",
    type=click.Path(path_type=Path),
    help="Plan from a `petitkexec snapshot` file instead of this machine.",
)
def plan(snapshot_path: Path | None, as_json: bool, **given: Any) -> None:
    """Show what a teardown would do to every PCI function. Changes nothing."""
    from petitkexec.plan import build_plan
    from petitkexec.render import facts_line, plan_summary, plan_to_json, plan_tree

    settings = _settings(given)
    if snapshot_path is not None:
        from petitkexec.snapshot import load_snapshot

        topology, facts = load_snapshot(snapshot_path)
    else:
        environment = _environment()
        topology, facts = environment.topology(), environment.facts()
    the_plan = build_plan(topology, settings.policy, facts)
    if as_json:
        from petitkexec.snapshot import facts_to_json

        _print_json({**plan_to_json(topology, the_plan), "facts": facts_to_json(facts)})
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
    import json

    from petitkexec.snapshot import snapshot_to_json

    environment = _environment()
    text = json.dumps(snapshot_to_json(environment.topology(), environment.facts()), indent=2)
    if output is None:
        click.echo(text)
        return
    try:
        output.write_text(text + "\n")
    except OSError as error:
        raise UsageError(
            "--output", str(output), f"cannot be written ({error.strerror})"
        ) from error


@cli.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--against",
    "snapshot_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The `petitkexec snapshot` taken before the kexec.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Look again until every function is back or this long has passed (drivers may "
    "still be probing early in boot).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@report_options(Scope.REPORT)
def verify(snapshot_path: Path, wait_s: float, as_json: bool, **given: Any) -> None:
    """After a kexec: is every PCI function of the snapshot back, with the driver it had?"""
    import time

    from petitkexec.snapshot import load_snapshot
    from petitkexec.verify import verify_until

    settings = resolve(given)  # only the command line: verify reads no config file
    before, _facts = load_snapshot(snapshot_path)
    started = time.monotonic()
    differences = verify_until(_environment().topology, before, wait_s)
    failures = [d for d in differences if d.change.is_failure]
    if settings.metrics is not None:
        from petitkexec import metrics

        seconds = time.monotonic() - started
        found = metrics.verify_metrics(len(before), differences, seconds, time.time())
        _write_metrics(settings.metrics, metrics.render(found))
    if as_json:
        _print_json(
            {
                "against": str(snapshot_path),
                "functions": len(before),
                "back": not failures,
                "differences": [
                    {
                        "bdf": str(d.bdf),
                        "change": d.change.value,
                        "before": d.before,
                        "after": d.after,
                    }
                    for d in differences
                ],
            }
        )
    for difference in differences:
        _echo_err(str(difference))
    _echo_err(
        f"{len(before) - len(failures)} of {len(before)} functions back as they were"
        if failures
        else f"all {len(before)} functions back as they were"
    )
    sys.exit(ExitCode.NOT_BACK if failures else ExitCode.OK)


@cli.command("install-systemd", epilog=EXIT_CODES_HELP)
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/"),
    show_default=True,
    help="Install into this root file system (an image being built).",
)
@click.option("--print", "print_only", is_flag=True, help="Show the files; write nothing.")
def install_systemd(root: Path, print_only: bool) -> None:
    """Install the systemd-shutdown hook (teardown before `systemctl kexec`) and the units
    that record devices at shutdown and verify them in the next boot."""
    from petitkexec import install

    command = install.this_command()
    if print_only:
        for item in install.files_to_install(command):
            click.echo(f"# {root / item.path} (mode {item.mode:04o})\n{item.text}")
        return
    for line in install.install(root, command):
        _echo_err(line)
    _echo_err(f"petitkexec runs as: {command}")


def _write_metrics(path: Path, text: str) -> None:
    """A textfile that cannot be written is one line; the command's result and exit code stay
    what they are (a metrics file never stands in the way of a handoff)."""
    from petitkexec import metrics

    try:
        metrics.write_textfile(path, text)
    except OSError as error:
        _echo_err(f"--metrics {path}: not written ({error.strerror or error})")


def _teardown_metrics(path: Path | None, report: TeardownReport) -> None:
    if path is not None:
        import time

        from petitkexec import metrics

        _write_metrics(path, metrics.render(metrics.teardown_metrics(report, time.time())))


def _print_outcome(index: int, total: int, outcome: StepOutcome) -> None:
    from petitkexec.render import outcome_line

    _echo_err(outcome_line(index, total, outcome))


def _print_report(report: TeardownReport) -> None:
    from petitkexec.render import report_lines

    for line in report_lines(report):
        _echo_err(line)


@cli.command(epilog=EXIT_CODES_HELP)
@setting_options(Scope.PLAN, Scope.EXECUTE, Scope.REPORT)
def teardown(as_json: bool, **given: Any) -> None:
    """Execute the plan: unbind drivers, clear bus master, optionally reset buses."""
    from petitkexec.render import report_to_json
    from petitkexec.run import prepare
    from petitkexec.run import teardown as run_teardown

    environment = _environment()
    settings = _settings(given)
    prepared = prepare(environment, settings)
    report = run_teardown(environment, prepared, _print_outcome)
    _teardown_metrics(settings.metrics, report)
    if as_json:
        _print_json(report_to_json(report))
    _print_report(report)
    sys.exit(report.exit_code)


@cli.command("exec", epilog=EXIT_CODES_HELP)
@setting_options(Scope.PLAN, Scope.EXECUTE, Scope.REPORT)
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
    help="The kexec binary (kexec-tools or kexec-lite) [default: kexec in PATH's absolute "
    "directories, then /usr/sbin, /sbin, /usr/bin, /bin, /usr/local/sbin].",
)
@click.option(
    "--syscall",
    is_flag=True,
    help="Hand off with reboot(LINUX_REBOOT_CMD_KEXEC) instead of `kexec -e` (images without "
    "kexec-tools; --load still needs a binary).",
)
@click.option(
    "--next-kernel-reset-phbs",
    "reset_phbs",
    is_flag=True,
    help="With --load: add ppc_pci_reset_phbs to the next kernel's command line, so it resets "
    "every PHB at boot (POWER; for xHCI controllers that do not halt across a kexec).",
)
@click.option("--strict", is_flag=True, help="Do not hand off if any teardown step failed.")
@click.option(
    "--watchdog",
    "watchdog_s",
    type=click.IntRange(min=1),
    metavar="SECONDS",
    help="Start the hardware watchdog with this timeout right before the handoff, so that a "
    "next kernel that hangs is reset (refused when the kernel would stop it at the kexec).",
)
@click.argument("kexec_args", nargs=-1, type=click.UNPROCESSED)
def exec_command(
    load_kernel: Path | None,
    initrd: Path | None,
    append: str | None,
    reuse_cmdline: bool,
    dtb: Path | None,
    kexec_path: str | None,
    syscall: bool,
    reset_phbs: bool,
    strict: bool,
    watchdog_s: int | None,
    kexec_args: tuple[str, ...],
    as_json: bool,
    **given: Any,
) -> None:
    """Preflight, optional load, teardown, then `kexec -e`. On success it never returns.

    Arguments after `--` go to `kexec -e`.
    """
    from petitkexec.handoff import LoadRequest, find_kexec
    from petitkexec.run import ArmedWatchdog, Handoff, HandoffRequest, exec_, prepare

    if append is not None and reuse_cmdline:
        raise UsageError("--append", append, "cannot be combined with --reuse-cmdline")
    if load_kernel is None and (initrd or append or reuse_cmdline or dtb or reset_phbs):
        raise UsageError(
            "--initrd/--append/--reuse-cmdline/--dtb/--next-kernel-reset-phbs",
            "",
            "need --load KERNEL",
        )
    kexec = find_kexec(kexec_path)
    if kexec_path is not None and kexec is None:
        raise UsageError("--kexec", kexec_path, "is not an executable file")
    environment = _environment()
    watchdog = None
    if watchdog_s is not None:
        watchdog = ArmedWatchdog(_the_watchdog(environment), watchdog_s)
    settings = _settings(given)
    prepared = prepare(environment, settings, watchdog.protection if watchdog else None)
    load = None
    if load_kernel is not None:
        load = LoadRequest(
            load_kernel,
            initrd,
            append,
            reuse_cmdline,
            dtb,
            file_load=prepared.facts.needs_file_load,
            reset_phbs=reset_phbs,
            running_cmdline=_running_cmdline(environment) if reset_phbs else "",
        )
    request = HandoffRequest(kexec, syscall, strict, kexec_args, load, watchdog)

    def handing_off(report: TeardownReport, command: str) -> None:
        _teardown_metrics(settings.metrics, report)  # the next boot reads it, if we are gone
        _handing_off(report, command)

    result = exec_(environment, prepared, request, _print_outcome, handing_off)
    if result.handoff is not Handoff.FAILED:  # a failed handoff's file is already written
        _teardown_metrics(settings.metrics, result.report)
    _print_exec_result(result, request, as_json)
    sys.exit(result.exit_code)


def _running_cmdline(environment: Environment) -> str:
    try:
        return (environment.proc_root / "cmdline").read_text().strip()
    except OSError as error:
        raise PreflightRefused(f"cannot read {environment.proc_root}/cmdline: {error}") from error


def _the_watchdog(environment: Environment) -> Watchdog:
    from petitkexec.watchdog import watchdogs

    found = next(watchdogs(environment.sysfs_root), None)
    if found is None:
        raise PreflightRefused("--watchdog: this machine has no hardware watchdog")
    return found


def _handing_off(report: TeardownReport, command: str) -> None:
    _print_report(report)
    _echo_err(f"handing off: {command}")


def _print_exec_result(result: ExecResult, request: HandoffRequest, as_json: bool) -> None:
    from petitkexec.render import report_to_json, rollback_lines, rollback_to_json
    from petitkexec.run import Handoff

    if result.handoff is Handoff.FAILED:
        assert result.failure is not None
        _echo_err(
            f"handoff failed: {' '.join(result.failure.command)} returned "
            f"{result.failure.returncode}: {result.failure.output}"
        )
        if result.signalled is not None:
            _echo_err(f"interrupted by {result.signalled} during the handoff")
        for line in rollback_lines(result.rollback):
            _echo_err(line)
        if result.left_as_is:
            _echo_err(
                f"not rolled back (--no-rollback): {result.left_as_is} changes left as they are"
            )
        if result.watchdog_after is not None:
            _echo_err(f"watchdog: {result.watchdog_after}")
    else:
        _print_report(result.report)
        if result.handoff is Handoff.DRY_RUN:
            _echo_err(f"dry run: would now run {request.describe()}")
        else:
            _echo_err(f"no handoff: {result.handoff.value}")
    if as_json:
        payload = {**report_to_json(result.report), "handoff": result.handoff.value}
        if result.failure is not None:
            payload["handoff_error"] = result.failure.output
            payload["rollback"] = rollback_to_json(result.rollback)
        _print_json(payload)


def main() -> None:
    cli()
