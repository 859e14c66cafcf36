"""Field knowledge about particular devices, as data: each entry says what it matches, what it
changes, and where it was learned. `plan` shows them in its reasons; `--ignore-quirk ID`
(config `ignore-quirks`) turns one off.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from petitkexec.model import PciFunction


class Effect(Enum):
    NOTE = "note"  # said in the plan's reason; the step stays as it is
    KEEP_BUS_MASTER = "keep-bus-master"  # never clear bus master on it


@dataclass(frozen=True)
class Quirk:
    """What is known about a device or driver, where from, and what the plan does about it."""

    id: str
    says: str
    source: str
    effect: Effect = Effect.NOTE
    driver: str | None = None
    vendor: int | None = None
    devices: frozenset[int] = frozenset()  # empty: any device of `vendor`
    class_prefix: str | None = None  # hex digits the 24-bit class starts with
    powernv_only: bool = False
    # The planned actions (petitkexec.plan.Action values) the quirk has something to say about.
    when: frozenset[str] = frozenset({"unbind", "clear-bus-master"})

    def matches(self, function: PciFunction, powernv: bool) -> bool:
        if self.powernv_only and not powernv:
            return False
        if self.driver is not None and function.driver != self.driver:
            return False
        if self.vendor is not None and function.vendor != self.vendor:
            return False
        if self.devices and function.device not in self.devices:
            return False
        return self.class_prefix is None or f"{function.class_code:06x}".startswith(
            self.class_prefix
        )

    def reason(self) -> str:
        return f"quirk {self.id}: {self.says} ({self.source})"


QUIRKS = (
    Quirk(
        "nvidia-remove-waits",
        "remove() waits while the GPU is in use (a CUDA job, nvidia-persistenced)",
        "NVIDIA/open-gpu-kernel-modules #1374, #1119",
        driver="nvidia",
        when=frozenset({"unbind"}),
    ),
    Quirk(
        "vfio-remove-waits",
        "remove() waits until the user of the device lets go of it",
        "vfio_pci_core_unregister_device(), drivers/vfio/pci/vfio_pci_core.c",
        driver="vfio-pci",
        when=frozenset({"unbind"}),
    ),
    Quirk(
        "xhci-powernv-halt",
        "may not halt across a kexec on POWER: --hot-reset, or --next-kernel-reset-phbs "
        "(ppc_pci_reset_phbs) for the next kernel",
        "op-build #307, #690, #775",
        class_prefix="0c0330",
        powernv_only=True,
    ),
    Quirk(
        "ahci-bus-master",
        "an AHCI controller failed in the next kernel after bus master was cleared; "
        "--exclude it if yours does",
        "linux-pci, 2020",
        class_prefix="010601",
    ),
    Quirk(
        "loongson-ls7a-root-port",
        "clearing bus master on LS7A root ports hangs the CPU",
        "commit 62b6dee1b44a; IDs from drivers/pci/controller/pci-loongson.c",
        Effect.KEEP_BUS_MASTER,
        vendor=0x0014,
        devices=frozenset({0x7A09, 0x7A19, 0x7A29, 0x7A39, 0x7A49, 0x7A59, 0x7A69}),
        when=frozenset({"unbind", "clear-bus-master", "skip"}),
    ),
)


def quirks_of(
    function: PciFunction, powernv: bool, ignored: frozenset[str] = frozenset()
) -> tuple[Quirk, ...]:
    return tuple(q for q in QUIRKS if q.id not in ignored and q.matches(function, powernv))
