"""Devices in use by processes, Live Update and watchdogs, on a fake sysfs and /proc whose
processes hold file descriptors (symbolic links named as the kernel shows them)."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import petitkexec.run
import petitkexec.watchdog
from petitkexec.bdf import Bdf
from petitkexec.errors import ExitCode
from petitkexec.facts import gather_facts
from petitkexec.inuse import NodeUse, device_nodes, scan_busy
from petitkexec.model import Topology
from petitkexec.plan import Action, build_plan
from petitkexec.storage import Backing, Storage
from petitkexec.watchdog import Watchdog, arm, disarm, watchdogs, why_it_stops
from tests.builders import bridge, endpoint, policy_of
from tests.clirun import environment, fake_kexec, invoke
from tests.conftest import SimFactory, q35_like
from tests.simkernel import SimFunction, SimKernel
from tests.test_facts import NVME_DISK, SATA_DISK, FakeMachine

GPU = "0000:41:00.0"
ESB_DRIVER = "i6300ESB timer"  # the PCI driver's name in drivers/watchdog/i6300esb.c
NVME = "0000:01:00.0"


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


def functions_in_use(sysfs_root: Path, proc_root: Path) -> list[NodeUse]:
    return scan_busy(sysfs_root, proc_root, Storage(sysfs_root, proc_root)).in_use


def device_node(machine: FakeMachine, kind: str, number: str, relative: str, name: str) -> None:
    """A device below a PCI function with its /sys/dev/KIND/MAJ:MIN link and DEVNAME."""
    directory = machine.directory(relative)
    (directory / "uevent").write_text(f"MAJOR={number.split(':')[0]}\nDEVNAME={name}\n")
    machine.link(machine.sys / "dev" / kind / number, directory)


def process(machine: FakeMachine, pid: int, comm: str, fds: dict[int, tuple[str, int]]) -> None:
    """A process holding each fd open on (path, open flags in octal)."""
    directory = machine.proc / str(pid)
    (directory / "fd").mkdir(parents=True)
    (directory / "fdinfo").mkdir()
    (directory / "comm").write_text(comm + "\n")
    for fd, (target, flags) in fds.items():
        os.symlink(target, directory / "fd" / str(fd))
        (directory / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t{flags:07o}\n")


def stat_as(files: dict[str, tuple[int, str]]) -> Callable[[str], os.stat_result]:
    """os.stat, but each path of `files` is a directory (S_IFDIR) or regular file (S_IFREG)
    on the block device MAJ:MIN given: a file system this test cannot mount."""

    def stat_file(path: str) -> os.stat_result:
        if path not in files:
            return os.stat(path)
        mode, device = files[path]
        major, minor = (int(number) for number in device.split(":"))
        return os.stat_result((mode | 0o755, 2, os.makedev(major, minor), 1, 0, 0, 0, 0, 0, 0))

    return stat_file


def test_a_gpu_held_open_is_protected_naming_the_process(machine: FakeMachine) -> None:
    gpus = machine.proc / "driver" / "nvidia" / "gpus" / GPU
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Model: H100\nDevice Minor: 0\n")
    process(machine, 4242, "python3", {0: ("/dev/null", 0o2), 5: ("/dev/nvidia0", 0o2)})
    process(machine, 7, "bash", {0: ("/dev/pts/0", 0o2)})
    facts = gather_facts(machine.sys, machine.proc)
    assert facts.needed == {Bdf.parse(GPU): "in use: /dev/nvidia0 by pid 4242 python3"}
    plan = build_plan(
        Topology.from_functions([endpoint(GPU, "nvidia", class_code=0x030200)]),
        policy_of(),
        facts,
    )
    assert str(plan.decision(Bdf.parse(GPU))) == (
        "protect (in use: /dev/nvidia0 by pid 4242 python3)"
    )


def test_a_disk_open_for_writing_is_in_use_but_not_one_open_for_reading(
    machine: FakeMachine,
) -> None:
    device_node(
        machine, "block", "259:0", f"pci0000:00/0000:00:1c.0/{NVME}/nvme/nvme0/nvme0n1", "nvme0n1"
    )
    process(machine, 10, "dd", {3: ("/dev/nvme0n1", 0o100001)})  # O_WRONLY | O_LARGEFILE
    process(machine, 11, "blkid", {3: ("/dev/nvme0n1", 0o100000)})  # O_RDONLY
    uses = functions_in_use(machine.sys, machine.proc)
    assert [str(use) for use in uses] == ["in use: /dev/nvme0n1 by pid 10 dd"]


def test_a_gpu_or_vfio_node_open_only_for_reading_is_in_use(machine: FakeMachine) -> None:
    # Unlike a disk, a character device is in use whatever its access mode: NVIDIA's remove()
    # waits for every open of /dev/nvidiaN (nvidia-smi opens it O_RDONLY), and vfio-pci's
    # remove() waits until the group's fd is closed, however it was opened.
    gpus = machine.proc / "driver" / "nvidia" / "gpus" / GPU
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Device Minor: 0\n")
    device_node(machine, "char", "511:3", "virtual/vfio/3", "vfio/3")
    machine.link(
        machine.sys / "kernel" / "iommu_groups" / "3" / "devices" / "0000:06:00.0",
        machine.directory("pci0000:00/0000:00:05.0/0000:06:00.0"),
    )
    process(machine, 50, "nvidia-smi", {3: ("/dev/nvidia0", 0o100000)})  # O_RDONLY|O_LARGEFILE
    process(machine, 51, "qemu", {7: ("/dev/vfio/3", 0o2000000)})  # O_RDONLY | O_CLOEXEC
    uses = {str(use.bdf): str(use) for use in functions_in_use(machine.sys, machine.proc)}
    assert uses == {
        GPU: "in use: /dev/nvidia0 by pid 50 nvidia-smi",
        "0000:06:00.0": "in use: /dev/vfio/3 by pid 51 qemu",
    }


def test_device_nodes_are_the_pci_ones_past_entries_that_cannot_be_read(
    machine: FakeMachine,
) -> None:
    # Unreadable entries come first and last in creation order, whatever order the
    # directory lists them in, one of them comes before a good one.
    broken = machine.directory(f"pci0000:00/{NVME}/nvme/nvme9")  # no uevent
    machine.link(machine.sys / "dev" / "char" / "240:9", broken)
    (machine.sys / "dev" / "block").mkdir(parents=True)
    (machine.sys / "dev" / "block" / "8:x").symlink_to("../../devices/pci0000:00/" + NVME)
    for gpu in ("0000:40:00.0", "not-a-bdf"):
        (machine.proc / "driver" / "nvidia" / "gpus" / gpu).mkdir(parents=True)  # no information
    device_node(machine, "char", "240:0", f"pci0000:00/0000:00:1c.0/{NVME}/nvme/nvme0", "nvme0")
    device_node(machine, "char", "4:1", "virtual/tty/tty1", "tty1")  # no PCI function
    device_node(
        machine, "block", "259:0", f"pci0000:00/0000:00:1c.0/{NVME}/nvme/nvme0/nvme0n1", "nvme0n1"
    )
    gpus = machine.proc / "driver" / "nvidia" / "gpus" / GPU
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Device Minor: 1\n")
    device_node(machine, "char", "226:0", f"pci0000:00/{GPU}/drm/card0", "dri/card0")
    late = machine.directory(f"pci0000:00/{GPU}/drm/card9")  # no uevent, created last
    machine.link(machine.sys / "dev" / "char" / "226:9", late)
    (machine.proc / "driver" / "nvidia" / "gpus" / "0000:42:00.0").mkdir()
    nvme, gpu = (Backing(Bdf.parse(NVME)),), (Backing(Bdf.parse(GPU)),)
    assert device_nodes(machine.sys, machine.proc, Storage(machine.sys, machine.proc)) == {
        "/dev/nvme0": (False, nvme),
        "/dev/nvme0n1": (True, nvme),
        "/dev/dri/card0": (False, gpu),
        "/dev/nvidia1": (False, gpu),
    }


def test_a_disk_whose_open_flags_cannot_be_read_counts_as_open_for_writing(
    machine: FakeMachine,
) -> None:
    device_node(
        machine, "block", "259:0", f"pci0000:00/0000:00:1c.0/{NVME}/nvme/nvme0/nvme0n1", "nvme0n1"
    )
    process(machine, 10, "", {3: ("/dev/nvme0n1", 0o100000)})  # O_RDONLY, comm empty
    (machine.proc / "10" / "fdinfo" / "3").unlink()  # closed and reopened, or not ours to read
    # The flags are octal: 010 is read-only (O_APPEND on sparc), though 10 & 3 would not be.
    process(machine, 11, "blkid", {3: ("/dev/nvme0n1", 0o10)})
    process(machine, 12, "gone", {4: ("/dev/nvme0n1", 0o1)})
    (machine.proc / "12" / "comm").unlink()  # exited meanwhile
    uses = [str(use) for use in functions_in_use(machine.sys, machine.proc)]
    assert sorted(uses) == ["in use: /dev/nvme0n1 by pid 10 ?", "in use: /dev/nvme0n1 by pid 12 ?"]


def test_the_live_update_agent_may_hold_a_gpu_too(machine: FakeMachine) -> None:
    gpus = machine.proc / "driver" / "nvidia" / "gpus" / GPU
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Device Minor: 0\n")
    fds = {fd: ("/dev/liveupdate", 0o2) for fd in range(3, 9)} | {9: ("/dev/nvidia0", 0o2)}
    process(machine, 1, "luod", fds)
    for pid in range(2, 8):
        process(machine, pid, "luo-client", {3: ("/dev/liveupdate", 0o2)})
    process(machine, 8, "python3", {3: ("/dev/nvidia0", 0o2)})
    uses = sorted(str(use) for use in functions_in_use(machine.sys, machine.proc))
    assert uses == ["in use: /dev/nvidia0 by pid 1 luod", "in use: /dev/nvidia0 by pid 8 python3"]


def test_an_nvme_multipath_namespace_open_for_writing_is_its_controllers_function(
    machine: FakeMachine,
) -> None:
    # Linux 6.1 in the q35 guest: a controller in an NVMe subsystem gets a multipath head,
    # /dev/nvme0n1, outside the PCI tree; the subsystem links to its controllers.
    controller = machine.directory(f"pci0000:00/0000:00:02.0/{NVME}/nvme/nvme0")
    subsystem = "virtual/nvme-subsystem/nvme-subsys0"
    device_node(machine, "block", "259:0", f"{subsystem}/nvme0n1", "nvme0n1")
    machine.link(machine.sys / "devices" / subsystem / "nvme0", controller)
    process(machine, 12, "sleep", {3: ("/dev/nvme0n1", 0o100002)})  # O_RDWR | O_LARGEFILE
    uses = functions_in_use(machine.sys, machine.proc)
    assert [(str(use.bdf), str(use)) for use in uses] == [
        (NVME, "in use: /dev/nvme0n1 by pid 12 sleep")
    ]


def test_a_loop_device_open_for_writing_needs_the_disk_holding_its_backing_file(
    machine: FakeMachine,
) -> None:
    # qemu writing to /dev/loop0: its file (loop_attr_backing_file_show()) is on the NVMe
    # disk, found through the same stat() as the mounts' (given to gather_facts()).
    machine.block(NVME_DISK, "259:0")
    loop = machine.directory("virtual/block/loop0")
    device_node(machine, "block", "7:0", "virtual/block/loop0", "loop0")
    (loop / "loop").mkdir()
    (loop / "loop" / "backing_file").write_text("/var/lib/images/petitkexec-test.img\n")
    process(machine, 30, "qemu-system-x86", {9: ("/dev/loop0", 0o100002)})  # O_RDWR
    files = {"/var/lib/images/petitkexec-test.img": (stat.S_IFREG, "259:0")}
    assert machine.needed(stat_file=stat_as(files)) == {
        NVME: "loop0 on /var/lib/images/petitkexec-test.img, in use: /dev/loop0 by pid 30 "
        "qemu-system-x86"
    }


def test_an_nvme_character_device_and_a_drm_node_lead_to_their_functions(
    machine: FakeMachine,
) -> None:
    device_node(machine, "char", "240:0", f"pci0000:00/0000:00:1c.0/{NVME}/nvme/nvme0", "nvme0")
    device_node(machine, "char", "226:0", f"pci0000:00/{GPU}/drm/card0", "dri/card0")
    process(machine, 20, "nvme", {3: ("/dev/nvme0", 0o2)})
    process(machine, 21, "Xorg", {9: ("/dev/dri/card0", 0o2)})
    uses = {str(use.bdf): use.node for use in functions_in_use(machine.sys, machine.proc)}
    assert uses == {NVME: "/dev/nvme0", GPU: "/dev/dri/card0"}


def test_an_open_vfio_group_protects_every_function_of_its_iommu_group(
    machine: FakeMachine,
) -> None:
    device_node(machine, "char", "511:0", "virtual/vfio/noiommu-0", "vfio/noiommu-0")
    group = machine.sys / "kernel" / "iommu_groups" / "0" / "devices"
    for bdf in ("0000:06:01.0", "0000:06:01.1"):
        machine.link(group / bdf, machine.directory(f"pci0000:00/0000:00:05.0/{bdf}"))
    process(machine, 30, "qemu-system-x86", {12: ("/dev/vfio/noiommu-0", 0o2)})
    facts = gather_facts(machine.sys, machine.proc)
    assert facts.needed == {
        Bdf.parse("0000:06:01.0"): "in use: /dev/vfio/noiommu-0 by pid 30 qemu-system-x86",
        Bdf.parse("0000:06:01.1"): "in use: /dev/vfio/noiommu-0 by pid 30 qemu-system-x86",
    }


def test_live_update_protects_every_vfio_pci_function_and_asks_for_kexec_s(
    machine: FakeMachine,
) -> None:
    (machine.proc / "cmdline").write_text("root=/dev/sda1 liveupdate=on\n")
    drivers = machine.sys / "bus" / "pci" / "drivers" / "vfio-pci"
    machine.link(drivers / "0000:06:01.0", machine.directory("pci0000:00/0000:06:01.0"))
    facts = gather_facts(machine.sys, machine.proc)
    assert facts.live_update == "liveupdate=on on the kernel command line"
    assert facts.needed == {
        Bdf.parse("0000:06:01.0"): "vfio-pci under Live Update (liveupdate=on on the kernel "
        "command line)"
    }
    assert facts.needs_file_load


@pytest.mark.parametrize(
    ("cmdline", "why"),
    [
        ("kho=on", "kho=on"),
        ("kho=1", "kho=1"),
        ("liveupdate=Y", "liveupdate=Y"),
        ("kho=true", "kho=true"),
        ("kho=on=1", "kho=on=1"),  # the value is all after the first '=' (next_arg)
        ("kho=0", None),
        ("kho=off", None),
        ("kho=n", None),
        ("kho=no", None),
        ("kho=N", None),
        ("kho=NO", None),
        ("kho=OFF", None),
        ("kho=false", None),
        ("kho", None),  # kstrtobool(NULL): -EINVAL, left off
        ("kho=maybe", None),  # -EINVAL: left as it was, off
        ("kho=1 kho=0", None),  # every occurrence is parsed: the last one wins
        ("kho=1 kho=no", None),
        ("kho=1 kho=N", None),
        ("kho=1 kho=false", None),
        ("kho=1 kho=F", None),
        ("kho=1 kho=off", None),
        ("kho=1 kho=OFF", None),
        ("kho=0 kho=yes", "kho=yes"),
        ("kho=1 kho=maybe", "kho=1"),  # an invalid one changes nothing
        ("liveupdate=0 kho=1", "kho=1"),
        ("kexec_kho=1 nokho=1", None),
    ],
)
def test_live_update_on_the_command_line_is_read_as_the_kernel_reads_it(
    machine: FakeMachine, cmdline: str, why: str | None
) -> None:
    # Both early_param handlers are kstrtobool() (kho_parse_enable, early_liveupdate_param).
    (machine.proc / "cmdline").write_text(f"root=/dev/sda1 {cmdline} quiet\n")
    expected = None if why is None else f"{why} on the kernel command line"
    assert gather_facts(machine.sys, machine.proc).live_update == expected


def test_live_update_is_also_the_agent_holding_dev_liveupdate(machine: FakeMachine) -> None:
    process(machine, 1, "luod", {4: ("/dev/liveupdate", 0o2)})
    assert gather_facts(machine.sys, machine.proc).live_update == (
        "/dev/liveupdate held by pid 1 luod"
    )


def test_a_protected_function_keeps_every_bridge_above_it_out_of_a_hot_reset(
    machine: FakeMachine,
) -> None:
    gpus = machine.proc / "driver" / "nvidia" / "gpus" / GPU
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Device Minor: 1\n")
    process(machine, 99, "nvidia-persiste", {3: ("/dev/nvidia1", 0o2)})
    topology = Topology.from_functions(
        [bridge("0000:40:01.0"), endpoint(GPU, "nvidia", parent="0000:40:01.0")]
    )
    plan = build_plan(topology, policy_of(hot_reset=True), gather_facts(machine.sys, machine.proc))
    assert plan.decision(Bdf.parse("0000:40:01.0")).action is Action.PROTECT
    assert plan.with_action(Action.RESET_BUS) == ()


def watchdog_device(machine: FakeMachine, bdf: str, driver: str, state: str) -> None:
    function = machine.directory(f"pci0000:00/{bdf}")
    machine.link(function / "driver", machine.sys / "bus" / "pci" / "drivers" / driver)
    (machine.sys / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
    real = machine.directory(f"pci0000:00/{bdf}/watchdog/watchdog0")
    machine.link(machine.sys / "class" / "watchdog" / "watchdog0", real)
    (real / "state").write_text(state + "\n")
    machine.link(real / "device", function)


def test_a_running_watchdog_is_protected(machine: FakeMachine) -> None:
    watchdog_device(machine, "0000:00:0b.0", ESB_DRIVER, "active")
    assert gather_facts(machine.sys, machine.proc).needed == {
        Bdf.parse("0000:00:0b.0"): "hardware watchdog watchdog0 is running"
    }


def test_a_watchdog_without_a_parent_is_found_through_its_identity(
    machine: FakeMachine,
) -> None:
    # i6300esb in Linux 6.1 (the q35 guest): /sys/class/watchdog/watchdog0 leads to
    # /sys/devices/virtual/watchdog/watchdog0, whose identity is the PCI driver's name.
    function = machine.directory("pci0000:00/0000:00:0b.0")
    machine.link(machine.sys / "bus" / "pci" / "drivers" / ESB_DRIVER / "0000:00:0b.0", function)
    real = machine.directory("virtual/watchdog/watchdog0")
    machine.link(machine.sys / "class" / "watchdog" / "watchdog0", real)
    (real / "state").write_text("active\n")
    (real / "identity").write_text(ESB_DRIVER + "\n")
    (watchdog,) = watchdogs(machine.sys)
    assert watchdog == Watchdog(
        "watchdog0", Bdf.parse("0000:00:0b.0"), ESB_DRIVER, True, identity=ESB_DRIVER
    )
    assert why_it_stops(machine.sys, watchdog) is not None
    assert gather_facts(machine.sys, machine.proc).needed == {
        Bdf.parse("0000:00:0b.0"): "hardware watchdog watchdog0 is running"
    }


def test_a_stopped_watchdog_is_not_protected(machine: FakeMachine) -> None:
    watchdog_device(machine, "0000:00:0b.0", ESB_DRIVER, "inactive")
    assert gather_facts(machine.sys, machine.proc).needed == {}
    (watchdog,) = watchdogs(machine.sys)
    assert watchdog == Watchdog("watchdog0", Bdf.parse("0000:00:0b.0"), ESB_DRIVER, False)


def watchdog_attributes(machine: FakeMachine, **attributes: str) -> None:
    """/sys/class/watchdog/watchdog0's attributes, and `parameter` as the watchdog core's
    stop_on_reboot (its module parameter)."""
    entry = machine.sys / "class" / "watchdog" / "watchdog0"
    entry.mkdir(parents=True)
    for name, value in attributes.items():
        if name == "parameter":
            parameters = machine.sys / "module" / "watchdog" / "parameters"
            parameters.mkdir(parents=True)
            (parameters / "stop_on_reboot").write_text(value + "\n")
        else:
            (entry / name).write_text(value + "\n")


# Each row: what sysfs shows, then the start of the refusal (None: --watchdog goes ahead).
# `options` 0x8180 has WDIOF_MAGICCLOSE (0x100), 0x8080 has not; Linux 6.1 shows no `options`.
KEXEC_STOPS = [
    ({"identity": ESB_DRIVER}, f"{ESB_DRIVER} stops it on reboot"),
    ({"identity": ESB_DRIVER, "parameter": "-1"}, f"{ESB_DRIVER} stops it on reboot"),
    ({"identity": ESB_DRIVER, "parameter": "0"}, None),
    ({"identity": "HPE iLO2+ HW Watchdog Timer", "options": "0x8180"}, None),
    ({"identity": "iTCO_wdt", "options": "0x8180"}, "iTCO_wdt stops it on reboot"),
    ({"identity": "SP5100 TCO timer"}, "SP5100 TCO timer stops it on reboot"),
    ({"identity": "iTCO_wdt", "parameter": "1"}, "watchdog.stop_on_reboot=1"),
    ({"identity": "HPE iLO2+ HW Watchdog Timer", "parameter": "1"}, "watchdog.stop_on_reboot=1"),
    (
        {"identity": "other_wdt", "options": "0x8180"},
        "other_wdt: whether its driver stops it at reboot is not known (not in petitkexec's "
        "table; boot with watchdog.stop_on_reboot=0 to keep it running)",
    ),
    ({"identity": "other_wdt", "options": "0x8180", "parameter": "0"}, None),
    ({"identity": "other_wdt", "options": "0x8080", "parameter": "0"}, "other_wdt has no magic"),
    ({"identity": "other_wdt", "options": "0x8080", "parameter": "0", "nowayout": "1"}, None),
    ({"identity": "iamt_wdt", "parameter": "0"}, "iamt_wdt has no magic close"),
    (
        {"identity": "other_wdt", "parameter": "0"},
        "other_wdt: whether closing /dev/watchdog0 stops it is not known (no `options` in "
        "sysfs, and not in petitkexec's table)",
    ),
    # `options` that is not a number tells nothing: not known, not "no magic close"
    ({"identity": "other_wdt", "options": "n/a", "parameter": "0"}, "other_wdt: whether closing"),
    ({"identity": "Software Watchdog", "parameter": "0"}, "Software Watchdog is a timer of the"),
]


@pytest.mark.parametrize(("attributes", "refusal"), KEXEC_STOPS)
def test_whether_the_running_kernel_stops_a_watchdog_before_the_next_kernel(
    machine: FakeMachine, attributes: dict[str, str], refusal: str | None
) -> None:
    watchdog_attributes(machine, **attributes)
    watchdog = Watchdog("watchdog0", None, None, True, identity=attributes["identity"])
    why = why_it_stops(machine.sys, watchdog)
    assert why == refusal if refusal is None else (why or "").startswith(refusal), why


@pytest.mark.parametrize("bound", [[], ["0000:00:0b.0", "0000:00:0c.0"]])
def test_an_identity_naming_no_single_bound_function_gives_no_function(
    machine: FakeMachine, bound: list[str]
) -> None:
    # Which of two functions a parentless watchdog belongs to cannot be told: none is
    # claimed (and protected) rather than a guess.
    drivers = machine.sys / "bus" / "pci" / "drivers" / ESB_DRIVER
    drivers.mkdir(parents=True)
    for bdf in bound:
        machine.link(drivers / bdf, machine.directory(f"pci0000:00/{bdf}"))
    real = machine.directory("virtual/watchdog/watchdog0")
    machine.link(machine.sys / "class" / "watchdog" / "watchdog0", real)
    (real / "state").write_text("active\n")
    (real / "identity").write_text(ESB_DRIVER + "\n")
    assert list(watchdogs(machine.sys)) == [
        Watchdog("watchdog0", None, None, True, identity=ESB_DRIVER)
    ]


def test_arming_sets_the_timeout_pings_and_closes_without_the_magic_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ioctls of include/uapi/linux/watchdog.h on /dev/watchdogN (a file here: the
    ioctls are recorded, not made)."""
    calls: list[tuple[str, object]] = []
    node = tmp_path / "watchdog1"
    node.write_bytes(b"")
    real_open = os.open

    opened: list[int] = []

    def open_(path: str, flags: int) -> int:
        calls.append(("open", (path, flags)))
        opened.append(real_open(node, flags))
        return opened[-1]

    def ioctl(fd: int, request: int, arg: bytes) -> None:
        assert fd == opened[-1]  # on the watchdog's own descriptor
        calls.append((hex(request), arg))

    monkeypatch.setattr(petitkexec.watchdog.os, "open", open_)
    monkeypatch.setattr(petitkexec.watchdog.fcntl, "ioctl", ioctl)
    closed: list[int] = []
    real_close = os.close

    def close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(petitkexec.watchdog.os, "close", close)
    watchdog = Watchdog("watchdog1", None, None, False)
    arm(watchdog, 45)
    assert calls == [
        ("open", ("/dev/watchdog1", os.O_WRONLY | os.O_CLOEXEC)),
        ("0xc0045706", struct.pack("i", 45)),  # WDIOC_SETTIMEOUT
        ("0x80045705", struct.pack("i", 0)),  # WDIOC_KEEPALIVE
    ]
    assert node.read_bytes() == b""  # no magic close: it keeps running
    calls.clear()
    disarm(watchdog)
    assert calls == [("open", ("/dev/watchdog1", os.O_WRONLY | os.O_CLOEXEC))]
    assert node.read_bytes() == b"V"  # the magic close stops it
    assert closed == opened and len(closed) == 2


def sim_watchdog(sim: SimKernel, bdf: str, stop_on_reboot_parameter: str) -> None:
    real = sim.device_dir(bdf).resolve() / "watchdog" / "watchdog0"
    real.mkdir(parents=True)
    (real / "state").write_text("inactive\n")
    (real / "device").symlink_to(os.path.relpath(sim.device_dir(bdf).resolve(), real))
    (sim.root / "class" / "watchdog").mkdir(parents=True)
    (sim.root / "class" / "watchdog" / "watchdog0").symlink_to(real)
    parameters = sim.root / "module" / "watchdog" / "parameters"
    parameters.mkdir(parents=True)
    (parameters / "stop_on_reboot").write_text(stop_on_reboot_parameter + "\n")


WATCHDOG_MACHINE = [SimFunction("0000:00:0b.0", 0x8086, 0x25AB, 0x088000, driver=ESB_DRIVER)]


def test_watchdog_is_refused_when_the_kernel_would_stop_it_at_kexec(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim([*q35_like(), *WATCHDOG_MACHINE])
    sim_watchdog(sim, "0000:00:0b.0", "-1")
    kexec = str(fake_kexec(tmp_path, sim))
    result = invoke(environment(sim, tmp_path), "exec", "--watchdog", "30", "--kexec", kexec)
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED
    assert (
        "petitkexec: --watchdog: the running kernel would stop watchdog0 before the next kernel "
        f"runs: {ESB_DRIVER} stops it on reboot (watchdog_stop_on_reboot(); boot with "
        "watchdog.stop_on_reboot=0)"
    ) in result.stderr
    assert "hint: nothing was touched; without --watchdog a hung next kernel is not reset" in (
        result.stderr
    )
    assert sim.writes() == []


def test_watchdog_is_refused_for_a_chipset_watchdog_the_kernel_stops_at_kexec(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    # iTCO_wdt, a platform device (lpc_ich), calls watchdog_stop_on_reboot() like i6300esb.
    sim = make_sim(q35_like())
    real = sim.root / "devices" / "platform" / "iTCO_wdt" / "watchdog" / "watchdog0"
    real.mkdir(parents=True)
    (real / "state").write_text("inactive\n")
    (real / "identity").write_text("iTCO_wdt\n")
    (sim.root / "class" / "watchdog").mkdir(parents=True)
    (sim.root / "class" / "watchdog" / "watchdog0").symlink_to(real)
    kexec = str(fake_kexec(tmp_path, sim))
    result = invoke(environment(sim, tmp_path), "exec", "--watchdog", "30", "--kexec", kexec)
    assert result.exit_code == ExitCode.PREFLIGHT_REFUSED, result.stderr
    assert "iTCO_wdt stops it on reboot" in result.stderr
    assert sim.writes() == []


def test_watchdog_is_armed_right_before_the_handoff_and_its_device_left_alone(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim([*q35_like(), *WATCHDOG_MACHINE])
    sim_watchdog(sim, "0000:00:0b.0", "0")
    # The stand-ins note how far the sim's writes log had got: /dev/watchdog0 is no sysfs file.
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(
        petitkexec.run, "arm", lambda w, s: events.append((f"arm {w.name} {s}", len(sim.writes())))
    )
    monkeypatch.setattr(
        petitkexec.run, "disarm", lambda w: events.append((f"disarm {w.name}", len(sim.writes())))
    )
    kexec = str(fake_kexec(tmp_path, sim))
    result = invoke(environment(sim, tmp_path), "exec", "--watchdog", "30", "--kexec", kexec)
    assert result.exit_code == ExitCode.HANDOFF_FAILED  # the stand-in kexec returns
    writes = [w["path"] for w in sim.writes()]
    assert [name for name, _ in events] == ["arm watchdog0 30", "disarm watchdog0"]
    (_, armed_at), (_, disarmed_at) = events
    # Armed after the teardown's last write (a watchdog running during a slow teardown could
    # reset the machine half torn down) and before the rollback's first: right before kexec.
    teardown, rollback = writes[:armed_at], writes[armed_at:]
    assert [p for p in writes if p.endswith("/unbind")] == [
        p for p in teardown if p.endswith("/unbind")
    ]
    assert not any(p.endswith("/bind") for p in teardown)
    assert rollback and rollback[0].endswith(("/bind", "/driver_override", "/config"))
    assert disarmed_at == len(writes)  # stopped again once the rollback is done
    assert "held: watchdog0 armed for the handoff by --watchdog" in result.stderr
    assert "watchdog: watchdog0 stopped again" in result.stderr
    assert not any("0000:00:0b.0" in w["path"] for w in sim.writes())


# --- every mount namespace --------------------------------------------------------------------

OWN_NAMESPACE, CONTAINER_NAMESPACE = "mnt:[4026531841]", "mnt:[4026532812]"


def in_namespace(machine: FakeMachine, pid: int, comm: str, namespace: str) -> Path:
    """A process in a mount namespace (/proc/PID/ns/mnt), with its own mountinfo."""
    directory = machine.proc / str(pid)
    (directory / "ns").mkdir(parents=True)
    (directory / "fd").mkdir()
    (directory / "comm").write_text(comm + "\n")
    os.symlink(namespace, directory / "ns" / "mnt")
    (directory / "mountinfo").write_text("")
    return directory


def test_a_disk_mounted_only_in_another_mount_namespace_is_protected_naming_it(
    machine: FakeMachine,
) -> None:
    machine.block("pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1", "259:0")
    machine.block("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdb", "8:16")
    root = "29 1 259:0 / / rw,relatime shared:1 - ext4 /dev/nvme0n1 rw"
    machine.mount(root)
    (machine.proc / "self" / "ns").mkdir()
    os.symlink(OWN_NAMESPACE, machine.proc / "self" / "ns" / "mnt")
    in_namespace(machine, 1, "init", OWN_NAMESPACE).joinpath("mountinfo").write_text(root)
    dockerd = in_namespace(machine, 812, "dockerd", CONTAINER_NAMESPACE)
    (dockerd / "mountinfo").write_text(
        f"{root}\n90 29 8:16 / /data rw,relatime - xfs /dev/sdb rw\n"
        "91 29 8:16 / /ro ro,relatime - xfs /dev/sdb ro\n"
    )
    in_namespace(machine, 813, "sh", CONTAINER_NAMESPACE)
    assert machine.needed() == {
        NVME: "backs / mounted rw",
        "0000:00:1f.2": "backs /data mounted rw in the mount namespace of pid 812 (dockerd)",
    }


def test_a_read_only_mount_in_another_namespace_needs_nothing(machine: FakeMachine) -> None:
    machine.block("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdb", "8:16")
    process = in_namespace(machine, 812, "dockerd", CONTAINER_NAMESPACE)
    (process / "mountinfo").write_text("22 1 8:16 / / ro,relatime - xfs /dev/sdb ro\n")
    assert machine.needed() == {}


def test_a_disk_read_only_here_but_writable_in_another_namespace_is_protected(
    machine: FakeMachine,
) -> None:
    machine.block("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdb", "8:16")
    machine.mount("40 29 8:16 / /srv ro,relatime - xfs /dev/sdb ro")
    process = in_namespace(machine, 900, "worker", CONTAINER_NAMESPACE)
    (process / "mountinfo").write_text(
        "40 29 8:16 / /srv ro,relatime - xfs /dev/sdb ro\n"
        "41 29 8:16 / /rw rw,relatime - xfs /dev/sdb rw\n"
    )
    assert machine.needed() == {
        "0000:00:1f.2": "backs /rw mounted rw in the mount namespace of pid 900 (worker)"
    }


def test_in_a_chroot_the_disks_only_pid_1_sees_are_protected_naming_the_chroot(
    machine: FakeMachine,
) -> None:
    # The kernel filters /proc/PID/mountinfo by PID's root (mounts_open_common(),
    # show_mountinfo()): in a chroot ours lacks the host's mounts, pid 1's has them.
    machine.block("pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1", "259:0")
    machine.block("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdb", "8:16")
    proc = "300 29 0:5 / /proc rw,nosuid - proc proc rw"
    machine.mount(proc)
    (machine.proc / "self" / "ns").mkdir()
    os.symlink(OWN_NAMESPACE, machine.proc / "self" / "ns" / "mnt")
    systemd = in_namespace(machine, 1, "systemd", OWN_NAMESPACE)
    (systemd / "mountinfo").write_text(
        "29 1 259:0 / / rw,relatime shared:1 - ext4 /dev/nvme0n1 rw\n"
        "30 29 8:16 / /home rw,relatime shared:2 - xfs /dev/sdb rw\n"
        "31 29 8:16 / /srv ro,relatime shared:3 - xfs /dev/sdb ro\n"
        "300 29 0:5 / /srv/chroot/proc rw,nosuid - proc proc rw\n"
    )
    in_namespace(machine, 4242, "petitkexec", OWN_NAMESPACE)
    outside = "as pid 1 (systemd) sees it, outside this chroot"
    assert machine.needed() == {
        NVME: f"backs / mounted rw {outside}",
        "0000:00:1f.2": f"backs /home mounted rw {outside}",
    }


def test_outside_a_chroot_pid_1s_table_adds_nothing(machine: FakeMachine) -> None:
    machine.block("pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdb", "8:16")
    table = "30 29 8:16 / /home ro,relatime shared:2 - xfs /dev/sdb ro"
    machine.mount(table)
    (machine.proc / "self" / "ns").mkdir()
    os.symlink(OWN_NAMESPACE, machine.proc / "self" / "ns" / "mnt")
    in_namespace(machine, 1, "systemd", OWN_NAMESPACE).joinpath("mountinfo").write_text(table)
    assert machine.needed() == {}


def test_a_mount_two_namespaces_list_is_read_once_through_the_lowest_pid(
    machine: FakeMachine,
) -> None:
    # dockerd's namespace (pid 812) and one cloned from it by `unshare -m` (pid 900; its
    # number is lower: proc_alloc_inum() reuses freed ones) both list the same overlay. Its
    # upperdir names a directory as dockerd sees it: through /proc/812/root it is on the NVMe
    # disk; through pid 900's root the same path is elsewhere, and is not looked at.
    machine.block(NVME_DISK, "259:0")
    machine.block(SATA_DISK, "8:0")
    upper = "/var/lib/docker/overlay2/petitkexec-test/diff"
    overlay = (
        "200 29 0:60 / /var/lib/docker/overlay2/petitkexec-test/merged rw,relatime - overlay"
        f" overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir={upper},workdir=/w\n"
    )
    in_namespace(machine, 812, "dockerd", "mnt:[4026532999]").joinpath("mountinfo").write_text(
        overlay
    )
    in_namespace(machine, 900, "unshare", "mnt:[4026532001]").joinpath("mountinfo").write_text(
        overlay
    )
    files = {
        f"{machine.proc}/812/root{upper}": (stat.S_IFDIR, "259:0"),
        f"{machine.proc}/900/root{upper}": (stat.S_IFDIR, "8:0"),
    }
    assert machine.needed(stat_file=stat_as(files)) == {
        NVME: "backs /var/lib/docker/overlay2/petitkexec-test/merged mounted rw in the mount "
        "namespace of pid 812 (dockerd)"
    }


def test_a_namespace_whose_process_exited_or_a_line_that_does_not_parse_skips_only_itself(
    machine: FakeMachine,
) -> None:
    machine.block(SATA_DISK, "8:0")
    exited = in_namespace(machine, 50, "sh", "mnt:[4026532700]")
    (exited / "mountinfo").unlink()  # gone between the walk over /proc and this read
    worker = in_namespace(machine, 900, "worker", CONTAINER_NAMESPACE)
    (worker / "mountinfo").write_text(
        "40 29 8:0 / /old rw,relatime\n"  # not a mountinfo line (none the kernel writes)
        "41 29 8:0 / /data rw,relatime - xfs /dev/sda rw\n"
    )
    assert machine.needed() == {
        "0000:00:1f.2": "backs /data mounted rw in the mount namespace of pid 900 (worker)"
    }


def test_a_watchdog_that_cannot_be_stopped_after_a_failed_handoff_is_said_to_reset_the_machine(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim([*q35_like(), *WATCHDOG_MACHINE])
    sim_watchdog(sim, "0000:00:0b.0", "0")
    monkeypatch.setattr(petitkexec.run, "arm", lambda _watchdog, _seconds: None)

    def busy(_watchdog: Watchdog) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(petitkexec.run, "disarm", busy)
    kexec = str(fake_kexec(tmp_path, sim))
    result = invoke(environment(sim, tmp_path), "exec", "--watchdog", "30", "--kexec", kexec)
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert (
        "watchdog: watchdog0 could not be stopped (Device or resource busy): it will reset the "
        "machine"
    ) in result.stderr
    assert sim.driver_of("0000:02:00.0") == "e1000e"  # rolled back all the same


def test_a_platform_watchdog_is_armed_with_no_pci_function_to_hold(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim(q35_like())
    real = sim.root / "devices" / "platform" / "iTCO_wdt" / "watchdog" / "watchdog0"
    real.mkdir(parents=True)
    (real / "state").write_text("inactive\n")
    (real / "identity").write_text("iTCO_wdt\n")
    (sim.root / "class" / "watchdog").mkdir(parents=True)
    (sim.root / "class" / "watchdog" / "watchdog0").symlink_to(real)
    parameters = sim.root / "module" / "watchdog" / "parameters"
    parameters.mkdir(parents=True)
    (parameters / "stop_on_reboot").write_text("0\n")
    armed: list[str] = []
    monkeypatch.setattr(petitkexec.run, "arm", lambda w, s: armed.append(f"{w.name} {s}"))
    monkeypatch.setattr(petitkexec.run, "disarm", lambda _watchdog: None)
    kexec = str(fake_kexec(tmp_path, sim))
    result = invoke(environment(sim, tmp_path), "exec", "--watchdog", "30", "--kexec", kexec)
    assert result.exit_code == ExitCode.HANDOFF_FAILED, result.stderr
    assert armed == ["watchdog0 30"]
    assert "armed for the handoff" not in result.stderr  # no PCI function is held for it
    assert "watchdog: watchdog0 stopped again" in result.stderr
