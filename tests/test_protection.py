"""What the running system needs stays untouched, and lifting that is visible in the plan."""

from __future__ import annotations

from pathlib import Path

from petitkexec.bdf import Bdf
from petitkexec.facts import gather_facts
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.plan import Action, build_plan
from petitkexec.policy import Policy
from tests.builders import policy_of

NFS_ROOT = "20 1 0:22 / / rw,relatime shared:1 - nfs4 server:/export rw,vers=4.2\n"


def fake_network_interface(sysfs: Path, name: str, bdf: str, operstate: str) -> None:
    device = sysfs / "devices" / "pci0000:00" / bdf
    (device / "net" / name).mkdir(parents=True)
    (device / "net" / name / "operstate").write_text(operstate + "\n")
    (device / "net" / name / "device").symlink_to(device)
    (sysfs / "class" / "net").mkdir(parents=True, exist_ok=True)
    (sysfs / "class" / "net" / name).symlink_to(device / "net" / name)


def test_nics_that_are_up_are_needed_while_a_network_file_system_is_mounted(tmp_path: Path) -> None:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(NFS_ROOT)
    fake_network_interface(sysfs, "eth0", "0000:00:03.0", "up")
    fake_network_interface(sysfs, "eth1", "0000:00:04.0", "down")
    needed = gather_facts(sysfs, proc).needed
    assert needed == {Bdf.parse("0000:00:03.0"): "eth0 may carry / (nfs4)"}


def test_nics_are_not_needed_without_a_network_file_system(tmp_path: Path) -> None:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("20 1 0:22 / / rw - tmpfs none rw\n")
    fake_network_interface(sysfs, "eth0", "0000:00:03.0", "up")
    assert gather_facts(sysfs, proc).needed == {}


def test_unprotect_tears_down_but_the_plan_says_what_it_takes_away() -> None:
    share = PciFunction(
        Bdf.parse("0000:00:05.0"),
        0x1AF4,
        0x1049,
        0x000200,
        0,
        0x0406,
        driver="virtio-pci",
        driver_can_unbind=True,
    )
    facts = SystemFacts(needed={share.bdf: "9p share 'hostshare' mounted at /mnt"})
    topology = Topology.from_functions([share])
    protected = build_plan(topology, Policy(), facts).decision(share.bdf)
    assert str(protected) == "protect (9p share 'hostshare' mounted at /mnt)"
    lifted = build_plan(topology, policy_of(unprotect=["virtio-pci"]), facts)
    step = lifted.decision(share.bdf)
    assert step.action is Action.UNBIND
    assert (
        step.reason == "virtio-pci, has unbind; unprotected: 9p share 'hostshare' mounted at /mnt"
    )
