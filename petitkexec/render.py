"""How a plan looks to a person (a tree, like `lspci -t`) and to a program (JSON)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.plan import Action, Plan

if TYPE_CHECKING:  # the teardown's types: `plan` never loads the executor
    from petitkexec.journal import UndoResult
    from petitkexec.outcome import StepOutcome, TeardownReport


def describe_function(function: PciFunction) -> str:
    driver = function.driver or "-"
    kind = (
        " [bridge]"
        if function.is_bridge
        else " [multi-function]"
        if (function.is_multifunction)
        else ""
    )
    vf = f" [VF of {function.physfn}]" if function.physfn is not None else ""
    return (
        f"{function.bdf} {function.vendor_device} class {function.class_code:06x} "
        f"driver {driver}{kind}{vf}"
    )


def plan_tree(topology: Topology, plan: Plan) -> str:
    """One line per function, indented under its bridge, with its planned step(s)."""
    actions: dict[Bdf, list[str]] = {}
    for step in plan.steps:
        actions.setdefault(step.bdf, []).append(str(step))
    lines: list[str] = []

    def walk(bdf: Bdf, prefix: str, last: bool) -> None:
        connector = "└─ " if last else "├─ "
        lines.append(
            f"{prefix}{connector}{describe_function(topology[bdf])}  →  "
            + "; then ".join(actions.get(bdf, ["(not planned)"]))
        )
        children = topology.children(bdf)
        for index, child in enumerate(children):
            walk(child, prefix + ("   " if last else "│  "), index == len(children) - 1)

    for domain in topology.domains:
        roots = [bdf for bdf in topology.children(None) if bdf.domain == domain]
        lines.append(f"PCI domain {domain:04x}")
        for index, bdf in enumerate(roots):
            walk(bdf, "", index == len(roots) - 1)
    return "\n".join(lines)


def plan_summary(plan: Plan) -> str:
    counts = {action: len(plan.with_action(action)) for action in Action}
    return ", ".join(f"{count} {action.value}" for action, count in counts.items() if count)


def plan_to_json(topology: Topology, plan: Plan) -> dict[str, Any]:
    return {
        "steps": [
            {
                "bdf": str(step.bdf),
                "action": step.action.value,
                "reason": step.reason,
                "driver": topology[step.bdf].driver,
                "vendor_device": topology[step.bdf].vendor_device,
            }
            for step in plan.steps
        ],
        "conflicts": list(plan.conflicts),
    }


def facts_line(facts: SystemFacts) -> str:
    loaded = {None: "unknown", True: "yes", False: "no"}[facts.kexec_loaded]
    return f"lockdown: {facts.lockdown or 'not exposed'}; kexec loaded: {loaded}"


def outcome_line(index: int, total: int, outcome: StepOutcome) -> str:
    """`[ 3/20] 0000:01:00.0 unbind           done: unbound from nvme; ... (12.3 ms)`"""
    step = outcome.step
    return (
        f"[{index:>{len(str(total))}}/{total}] {step.bdf} {step.action.value:<16} "
        f"{outcome.status.value}: {outcome.detail} ({outcome.elapsed_ms:.1f} ms)"
    )


def report_lines(report: TeardownReport) -> list[str]:
    """The summary a person reads after the step lines: per-device results, then problems."""
    lines = [
        f"{name.replace('_', ' ')}: {len(bdfs)} ({', '.join(bdfs)})"
        for name, bdfs in report.summary().items()
        if bdfs
    ]
    lines += [f"FAILED {outcome.step.bdf}: {outcome.detail}" for outcome in report.failed]
    if report.stopped_because:
        lines.append(f"stopped: {report.stopped_because}")
    if report.outcomes:
        chain = " → ".join(step for step, _ms in report.critical_path)
        lines.append(
            f"wall time {report.wall_ms:.0f} ms; critical path {report.critical_path_ms:.0f} ms"
            + (f" ({chain})" if chain else "")
        )
    return lines + rollback_lines(report.rollback)


def rollback_lines(results: tuple[UndoResult, ...] | list[UndoResult]) -> list[str]:
    return [
        f"rollback: {result.undo.describe()}: {'ok' if result.ok else result.detail}"
        for result in results
    ]


def rollback_to_json(results: tuple[UndoResult, ...] | list[UndoResult]) -> list[dict[str, Any]]:
    return [{"undo": r.undo.describe(), "ok": r.ok, "detail": r.detail} for r in results]


def report_to_json(report: TeardownReport) -> dict[str, Any]:
    return {
        "summary": report.summary(),
        "steps": [
            {
                "bdf": str(o.step.bdf),
                "action": o.step.action.value,
                "status": o.status.value,
                "detail": o.detail,
                "elapsed_ms": o.elapsed_ms,
                "driver_after": o.driver_after,
                "command_after": None if o.command_after is None else f"{o.command_after:04x}",
            }
            for o in report.outcomes
        ],
        "stopped_because": report.stopped_because,
        "wall_ms": report.wall_ms,
        "critical_path_ms": report.critical_path_ms,
        "critical_path": [{"step": step, "elapsed_ms": ms} for step, ms in report.critical_path],
        "hung": [str(bdf) for bdf in report.hung],
        "rollback": rollback_to_json(report.rollback),
    }
