"""PciFunction and Policy builders for hand-built topologies in the plan and policy tests."""

from __future__ import annotations

from petitkexec.bdf import Bdf
from petitkexec.model import PciFunction
from petitkexec.policy import Policy
from petitkexec.settings import resolve

BME_ON = 0x0406  # memory space, bus master, INTx disabled
BME_OFF = 0x0002


def endpoint(
    bdf: str,
    driver: str | None = None,
    *,
    parent: str | None = None,
    physfn: str | None = None,
    can_unbind: bool | None = None,
    command: int | None = BME_ON,
    vendor: int = 0x8086,
    device: int = 0x10D3,
    class_code: int = 0x020000,
    header_type: int | None = 0x00,
) -> PciFunction:
    return PciFunction(
        bdf=Bdf.parse(bdf),
        vendor=vendor,
        device=device,
        class_code=class_code,
        header_type=header_type,
        command=command,
        driver=driver,
        driver_can_unbind=driver is not None if can_unbind is None else can_unbind,
        parent=None if parent is None else Bdf.parse(parent),
        physfn=None if physfn is None else Bdf.parse(physfn),
    )


def bridge(
    bdf: str,
    driver: str | None = "pcieport",
    *,
    parent: str | None = None,
    can_unbind: bool | None = None,
    command: int | None = 0x0407,
    header_type: int | None = 0x01,
) -> PciFunction:
    return endpoint(
        bdf,
        driver,
        parent=parent,
        can_unbind=can_unbind,
        command=command,
        vendor=0x8086,
        device=0x9D10,
        class_code=0x060400,
        header_type=header_type,
    )


def policy_of(*, config: dict[str, object] | None = None, **given: object) -> Policy:
    """A Policy as the command line (`given`, by setting name) and a config file make it."""
    return resolve(given, config).policy
