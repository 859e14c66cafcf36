"""How a plan looks to a person (a tree, like `lspci -t`) and to a program (JSON)."""

from __future__ import annotations

from typing import Any

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction, Topology
from petitkexec.plan import Action, Plan


def describe_function(function: PciFunction) -> str:
    driver = function.driver or "-"
    kind = " [bridge]" if function.is_bridge else ""
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
