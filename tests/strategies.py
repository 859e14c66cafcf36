"""Hypothesis strategies: random but consistent PCI topologies, with policies and facts.

A topology is built the way a machine is: each domain has a root bus; each bus holds a few
devices of one to three functions; a function is an endpoint, a bridge with its own secondary
bus below it, or an SR-IOV PF whose VFs sit on the same bus (so they share the PF's parent).
Addresses never collide and every parent/physfn names a function that exists.

Strategies are built once at import: building them inside the draws costs most of the run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from petitkexec.bdf import Bdf
from petitkexec.model import CONFIG_GONE, PciFunction, SystemFacts, Topology
from petitkexec.policy import Policy
from tests.builders import policy_of

# (vendor, device, class, the drivers seen bound to it)
DeviceKind = tuple[int, int, int, tuple[str, ...]]

ENDPOINT_KINDS: tuple[DeviceKind, ...] = (
    (0x144D, 0xA808, 0x010802, ("nvme",)),
    (0x8086, 0x2922, 0x010601, ("ahci",)),
    (0x8086, 0x10D3, 0x020000, ("e1000e",)),
    (0x15B3, 0x1017, 0x020000, ("mlx5_core", "vfio-pci")),
    (0x1B36, 0x000D, 0x0C0330, ("xhci_hcd",)),
    (0x1AF4, 0x1041, 0x020000, ("virtio-pci",)),
    (0x1234, 0x1111, 0x030000, ()),
    (0x8086, 0x2918, 0x060100, ("lpc_ich",)),
    (0x8086, 0x2930, 0x0C0500, ("i801_smbus",)),
)
VF_KINDS: tuple[DeviceKind, ...] = (
    (0x15B3, 0x1018, 0x020000, ("mlx5_core", "vfio-pci")),
    (0x8086, 0x10ED, 0x020000, ("ixgbevf",)),
)
BRIDGE_DRIVERS = (None, "pcieport", "shpchp")
READABLE_COMMANDS = (0x0000, 0x0002, 0x0004, 0x0006, 0x0007, 0x0406, 0x0507)
DOMAINS = (0x0000, 0x0001, 0x0030, 0x10000)
REASONS = (
    "backs / mounted rw",
    "backs /var mounted rw",
    "console ttyS0",
    "9p share 'hostshare' mounted at /mnt",
)
ALL_ONES = 0xFF  # what a gone / link-down / EEH-frozen function reads everywhere

_booleans = st.booleans()
_endpoint_kinds = st.sampled_from(ENDPOINT_KINDS)
_vf_kinds = st.sampled_from(VF_KINDS)
_bridge_drivers = st.sampled_from(BRIDGE_DRIVERS)
_commands = st.sampled_from(READABLE_COMMANDS)
_device_counts = {True: st.integers(1, 3), False: st.integers(0, 3)}
_function_counts = st.integers(1, 3)
_vf_counts = st.integers(1, 3)
_one_in_four = st.integers(0, 3)
_one_in_five = st.integers(0, 4)
_one_in_ten = st.integers(0, 9)
_kinds = {
    True: st.sampled_from(("endpoint", "pf", "bridge")),
    False: st.sampled_from(("endpoint", "pf")),
}
_drivers_of = {
    kind[3]: st.sampled_from((None, *kind[3])) for kind in (*ENDPOINT_KINDS, *VF_KINDS) if kind[3]
}
_class_digits = st.sampled_from((2, 4, 6))
_domain_lists = st.lists(st.sampled_from(DOMAINS), min_size=1, max_size=3, unique=True)
_reasons = st.sampled_from(REASONS)
_lockdowns = st.sampled_from((None, "none", "integrity", "confidentiality"))
_kexec_loaded = st.sampled_from((None, True, False))


@dataclass
class _Builder:
    """Allocates addresses while the recursive drawing below fills in functions."""

    budget: int
    max_depth: int
    functions: list[PciFunction] = field(default_factory=list)
    next_bus: dict[int, int] = field(default_factory=dict)


def _config(draw: st.DrawFn, header_type: int) -> tuple[int | None, int | None]:
    """(command, header type): mostly readable, sometimes gone or unreadable."""
    if draw(_one_in_ten) > 0:
        return draw(_commands), header_type
    if draw(_booleans):
        return CONFIG_GONE, ALL_ONES  # gone, link down or EEH-frozen
    return None, None  # config space could not be read at all


def _non_bridge(
    draw: st.DrawFn,
    kind: DeviceKind,
    bdf: Bdf,
    parent: Bdf | None,
    multifunction: bool,
    physfn: Bdf | None = None,
) -> PciFunction:
    vendor, device, class_code, drivers = kind
    driver = draw(_drivers_of[drivers]) if drivers else None
    # Most drivers expose unbind; suppress_bind_attrs is the exception.
    can_unbind = driver is not None and draw(_one_in_four) > 0
    command, header = _config(draw, 0x80 if multifunction else 0x00)
    return PciFunction(
        bdf=bdf,
        vendor=vendor,
        device=device,
        class_code=class_code,
        header_type=header,
        command=command,
        driver=driver,
        driver_can_unbind=can_unbind,
        parent=parent,
        physfn=physfn,
    )


def _fill_bus(
    draw: st.DrawFn, builder: _Builder, domain: int, bus: int, parent: Bdf | None, depth: int
) -> None:
    slot = 0
    for _ in range(draw(_device_counts[depth == 0])):
        if builder.budget <= 0:
            return
        function_count = draw(_function_counts)
        multifunction = function_count > 1
        pfs: list[Bdf] = []
        for number in range(function_count):
            if builder.budget <= 0:
                break
            builder.budget -= 1
            bdf = Bdf(domain, bus, slot, number)
            may_bridge = depth < builder.max_depth and builder.next_bus[domain] <= 0xFF
            kind = draw(_kinds[may_bridge])
            if kind != "bridge":
                builder.functions.append(
                    _non_bridge(draw, draw(_endpoint_kinds), bdf, parent, multifunction)
                )
                if kind == "pf":
                    pfs.append(bdf)
                continue
            # A bridge whose config space reads gone is still known as one by its class.
            driver = draw(_bridge_drivers)
            command, header = _config(draw, 0x81 if multifunction else 0x01)
            builder.functions.append(
                PciFunction(
                    bdf=bdf,
                    vendor=0x8086,
                    device=0x9D10,
                    class_code=0x060400,
                    header_type=header,
                    command=command,
                    driver=driver,
                    driver_can_unbind=driver is not None and draw(_one_in_four) > 0,
                    parent=parent,
                )
            )
            secondary = builder.next_bus[domain]
            builder.next_bus[domain] += 1
            _fill_bus(draw, builder, domain, secondary, bdf, depth + 1)
        slot += 1
        for pf in pfs:
            # VFs get their own slot on the PF's bus (routing IDs after the PF's).
            for number in range(draw(_vf_counts)):
                builder.budget -= 1
                vf = Bdf(domain, bus, slot, number)
                builder.functions.append(
                    _non_bridge(draw, draw(_vf_kinds), vf, parent, False, physfn=pf)
                )
            slot += 1


@st.composite
def topologies(draw: st.DrawFn, max_functions: int = 24, max_depth: int = 3) -> Topology:
    """A consistent topology over one to three domains, with nested bridges and SR-IOV."""
    builder = _Builder(budget=max_functions, max_depth=max_depth)
    for domain in sorted(draw(_domain_lists)):
        builder.next_bus[domain] = 1
        _fill_bus(draw, builder, domain, bus=0, parent=None, depth=0)
    return Topology.from_functions(builder.functions)


def _spec_for(draw: st.DrawFn, function: PciFunction) -> str:
    """A device spec of any kind that matches this function."""
    bdf = function.bdf
    choices = [
        str(bdf),
        f"{bdf.domain:04x}:{bdf.bus:02x}:{bdf.device:02x}.*",
        function.vendor_device,
        f"{function.vendor:04x}:*",
        f"class:{function.class_code:06x}"[: 6 + draw(_class_digits)],
    ]
    if bdf.domain == 0:
        choices.append(f"{bdf.bus:02x}:{bdf.device:02x}.{bdf.function}")
    if function.driver is not None:
        choices += [function.driver, f"driver:{function.driver}"]
    return choices[draw(st.integers(0, len(choices) - 1))]


def _specs(draw: st.DrawFn, functions: list[PciFunction], max_size: int) -> list[str]:
    count = draw(st.integers(0, max_size))
    picks = st.integers(0, len(functions) - 1)
    return [_spec_for(draw, functions[draw(picks)]) for _ in range(count)]


@dataclass(frozen=True)
class Scenario:
    """Everything build_plan takes."""

    topology: Topology
    policy: Policy
    facts: SystemFacts


@st.composite
def scenarios(draw: st.DrawFn, max_functions: int = 24, hot_reset: bool | None = None) -> Scenario:
    """A topology with random needs (facts) and a random --exclude/--only/--unprotect policy;
    `hot_reset` fixes the flag instead of drawing it."""
    topology = draw(topologies(max_functions=max_functions))
    functions = list(topology)
    picks = st.integers(0, len(functions) - 1)
    needed = {functions[draw(picks)].bdf: draw(_reasons) for _ in range(draw(st.integers(0, 2)))}
    policy = policy_of(
        exclude=_specs(draw, functions, 1),
        only=_specs(draw, functions, 2) if draw(_one_in_five) == 0 else [],
        unprotect=_specs(draw, functions, 1),
        hot_reset=draw(_booleans) if hot_reset is None else hot_reset,
    )
    facts = SystemFacts(needed=needed, lockdown=draw(_lockdowns), kexec_loaded=draw(_kexec_loaded))
    return Scenario(topology, policy, facts)
