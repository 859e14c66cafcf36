"""One run of a command, without click: discover → plan → (preflight, load) → teardown → hand off.

Once the teardown has begun, nothing leaves this module without the journal rolled back (or
left as it is, with --no-rollback, and said so): a failed handoff, a signal at any point up to
the handoff, a hung step, and any exception at all, ours or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from petitkexec.bdf import Bdf
from petitkexec.environment import Environment
from petitkexec.errors import ExitCode, PreflightRefused, RolledBack
from petitkexec.execute import OutcomeCallback, Teardown
from petitkexec.handoff import (
    HandoffResult,
    LoadRequest,
    exec_argv,
    execute_loaded_kernel,
    load,
)
from petitkexec.journal import UndoResult
from petitkexec.log import get_logger, timed
from petitkexec.lookagain import look_again
from petitkexec.model import SystemFacts, Topology
from petitkexec.outcome import TeardownReport
from petitkexec.plan import Plan, build_plan
from petitkexec.preflight import PreflightInput, check_can_hand_off, check_can_tear_down
from petitkexec.settings import Settings
from petitkexec.watchdog import Watchdog, arm, disarm, why_it_stops


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Prepared:
    """What a teardown acts on: the machine as discovered, and the plan for it."""

    topology: Topology
    facts: SystemFacts
    plan: Plan
    settings: Settings


def prepare(
    environment: Environment, settings: Settings, also_needed: Mapping[Bdf, str] | None = None
) -> Prepared:
    """Discover and plan; `also_needed` adds functions the command itself needs (the
    watchdog --watchdog arms)."""
    log = get_logger("petitkexec")
    with timed(log, "discovered") as fields:
        topology, facts = environment.topology(), environment.facts()
        if also_needed:
            facts = dataclasses.replace(facts, needed={**also_needed, **facts.needed})
        fields.update(functions=len(topology), needed=len(facts.needed), lockdown=facts.lockdown)
    with timed(log, "planned") as fields:
        plan = build_plan(topology, settings.policy, facts)
        fields.update(steps=len(plan.steps), waves=len({s.wave for s in plan.steps}))
    return Prepared(topology, facts, plan, settings)


def teardown(
    environment: Environment, prepared: Prepared, on_outcome: OutcomeCallback | None = None
) -> TeardownReport:
    """`petitkexec teardown`: the plan carried out (or shown, with --dry-run)."""
    if not prepared.settings.execution.dry_run:
        check_can_tear_down(environment.euid, prepared.plan)
    run = _teardown(environment, prepared, on_outcome)
    with _guarded(run):
        return run.stop_if_signalled(run.read_back(_timed_run(run)))


class Handoff(Enum):
    """How an `exec` ended, when it returned at all."""

    DRY_RUN = "not attempted (dry run)"
    WITHHELD = "not attempted (--strict: a step failed)"
    STOPPED = "not attempted (the run was stopped: a step hung, a signal, or the time limit)"
    FAILED = "failed"


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class ArmedWatchdog:
    """--watchdog: a hardware watchdog started right before the handoff, so that a next
    kernel that hangs is reset."""

    watchdog: Watchdog
    timeout_s: int

    @property
    def protection(self) -> dict[Bdf, str]:
        if self.watchdog.bdf is None:
            return {}
        return {self.watchdog.bdf: f"{self.watchdog.name} armed for the handoff by --watchdog"}


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class HandoffRequest:
    """How `exec` hands off: the kexec binary or the syscall, and what comes with it."""

    kexec: str | None  # the absolute path preflight resolved, None if there is none
    syscall: bool = False  # reboot(LINUX_REBOOT_CMD_KEXEC) instead of `kexec -e`
    strict: bool = False
    kexec_args: tuple[str, ...] = ()
    load: LoadRequest | None = None
    watchdog: ArmedWatchdog | None = None

    @property
    def binary(self) -> str | None:
        return None if self.syscall else self.kexec

    def describe(self) -> str:
        if self.binary is None:
            return "reboot(LINUX_REBOOT_CMD_KEXEC)"
        return " ".join(exec_argv(self.binary, self.kexec_args))


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class ExecResult:
    """How an `exec` that returned ended, with its report and any rollback."""

    report: TeardownReport
    handoff: Handoff
    failure: HandoffResult | None = None
    rollback: tuple[UndoResult, ...] = ()
    watchdog_after: str | None = None  # what became of --watchdog's watchdog after a failure
    signalled: str | None = None  # a stop signal that came during the handoff
    left_as_is: int = 0  # changes --no-rollback left in place after the failure

    @property
    def exit_code(self) -> ExitCode:
        if self.handoff is Handoff.FAILED:
            return ExitCode.INTERRUPTED if self.signalled else ExitCode.HANDOFF_FAILED
        return self.report.exit_code


def exec_(
    environment: Environment,
    prepared: Prepared,
    request: HandoffRequest,
    on_outcome: OutcomeCallback | None = None,
    on_handing_off: Callable[[TeardownReport, str], None] | None = None,
) -> ExecResult:
    """`petitkexec exec`: preflight, load, teardown, handoff. Returns only if the machine is
    still ours: nothing to hand off to, a handoff withheld, or a handoff that failed (then
    the teardown has been rolled back)."""
    dry_run = prepared.settings.execution.dry_run
    check_can_hand_off(
        PreflightInput(
            prepared.facts,
            prepared.plan,
            request.kexec,
            request.syscall,
            request.load is not None,
            # --dry-run changes nothing, so it needs no root; every other check still applies.
            0 if dry_run else environment.euid,
        )
    )
    if request.watchdog is not None:
        why = why_it_stops(environment.sysfs_root, request.watchdog.watchdog)
        if why is not None:
            raise PreflightRefused(
                f"--watchdog: the running kernel would stop {request.watchdog.watchdog.name} "
                f"before the next kernel runs: {why}",
                hint="nothing was touched; without --watchdog a hung next kernel is not reset",
            )
    if request.load is not None and not dry_run:
        assert request.kexec is not None  # preflight refuses --load without a binary
        failure = load(request.load, request.kexec)
        if failure is not None:
            raise PreflightRefused(
                f"kexec load failed ({failure.returncode}): {failure.output}",
                hint="nothing was touched; " + " ".join(failure.command),
            )
    run = _teardown(environment, prepared, on_outcome)
    with _guarded(run):
        report = _timed_run(run)
        if dry_run:
            return ExecResult(report, Handoff.DRY_RUN)
        report = run.stop_if_signalled(run.read_back(report))
        if not report.handoff_safe:
            return ExecResult(report, Handoff.STOPPED)
        if request.strict and report.failed:
            return ExecResult(report, Handoff.WITHHELD)
        if on_handing_off is not None:
            on_handing_off(report, request.describe())
        if request.watchdog is not None:
            arm(request.watchdog.watchdog, request.watchdog.timeout_s)
        failure = execute_loaded_kernel(
            request.binary, request.kexec_args, go_on=lambda: run.interrupted_by is None
        )
        # Still here: kexec refused, or a stop signal came before it ran. Put the devices back
        # (unless --no-rollback) so a bootloader menu or shell works.
        rollback = run.rollback()
        watchdog_after = None
        if request.watchdog is not None:
            watchdog_after = _disarm(request.watchdog.watchdog)
        return ExecResult(
            report,
            Handoff.FAILED,
            failure,
            rollback,
            watchdog_after,
            signalled=run.interrupted_by,
            left_as_is=len(run.journal.entries),
        )


def _disarm(watchdog: Watchdog) -> str:
    try:
        disarm(watchdog)
    except OSError as error:
        return f"{watchdog.name} could not be stopped ({error.strerror}): it will reset the machine"
    return f"{watchdog.name} stopped again (unless its driver was loaded with nowayout)"


def _teardown(
    environment: Environment, prepared: Prepared, on_outcome: OutcomeCallback | None
) -> Teardown:
    execution = prepared.settings.execution
    plan = prepared.plan if execution.dry_run else _looked_again(environment, prepared)
    return Teardown(environment.kernel(), prepared.topology, plan, execution, on_outcome=on_outcome)


def _looked_again(environment: Environment, prepared: Prepared) -> Plan:
    """The plan again if something became needed since the scan: it is protected, and the
    report says so (lookagain.py)."""
    facts, appeared = look_again(prepared.facts, environment.facts)
    if not appeared:
        return prepared.plan
    needed = [f"{bdf}: {reason}" for bdf, reason in appeared.items()]
    get_logger("petitkexec").warning("needed since the scan", functions=needed)
    return build_plan(prepared.topology, prepared.settings.policy, facts)


def _timed_run(run: Teardown) -> TeardownReport:
    with timed(get_logger("petitkexec"), "torn down", dry_run=run.options.dry_run) as fields:
        report = run.run()
        fields.update(failed=len(report.failed), stopped=report.stopped_because)
    return report


@contextmanager
def _guarded(run: Teardown) -> Iterator[None]:
    """From the first write to the end of the handoff or rollback: stop signals are recorded
    (petitkexec.signals), and any exception rolls the journal back (unless --no-rollback)
    before it is reported with the rollback's results."""
    with run.signals.installed():
        try:
            yield
        except BaseException as error:
            if isinstance(error, GeneratorExit):
                raise
            left = 0 if run.options.rollback else len(run.journal.entries)
            raise RolledBack(error, run.rollback(), left_as_is=left) from error
