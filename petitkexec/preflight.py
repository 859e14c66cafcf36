"""What must hold before anything is touched; a refusal changes nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass

from petitkexec.errors import PreflightRefused
from petitkexec.model import SystemFacts
from petitkexec.plan import Plan


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class PreflightInput:
    """What the checks before an exec look at."""

    facts: SystemFacts
    plan: Plan
    kexec: str | None  # the binary that will run `-e`, None if not found
    use_syscall: bool  # --syscall: reboot(LINUX_REBOOT_CMD_KEXEC) instead of `kexec -e`
    will_load: bool  # --load was given: the kernel gets loaded after these checks
    euid: int = -1

    def effective_euid(self) -> int:
        return os.geteuid() if self.euid < 0 else self.euid


def check_can_tear_down(euid: int, plan: Plan) -> None:
    if euid != 0:
        raise PreflightRefused(
            "not root: unbinding drivers and writing config space need CAP_SYS_ADMIN",
            hint="run it as root, or try `petitkexec plan`",
        )
    if plan.conflicts:
        raise PreflightRefused(plan.conflicts[0], hint="change --only/--exclude/--unprotect")


def check_can_hand_off(given: PreflightInput) -> None:
    check_can_tear_down(given.effective_euid(), given.plan)
    if given.kexec is None and not given.use_syscall:
        raise PreflightRefused(
            "no kexec binary found (kexec-tools or kexec-lite)",
            hint="install kexec-tools, pass --kexec PATH, or hand off with --syscall",
        )
    if given.will_load and given.kexec is None:
        raise PreflightRefused(
            "--load needs a kexec binary to load with",
            hint="install kexec-tools or pass --kexec PATH",
        )
    if not given.will_load and given.facts.kexec_loaded is not True:
        raise PreflightRefused(
            "no kernel is loaded for kexec (/sys/kernel/kexec_loaded is not 1)",
            hint="pass --load KERNEL [--initrd F] [--append S], or run `kexec -l` first",
        )
