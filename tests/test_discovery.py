"""Discovery through pyudev on sysfs trees that umockdev's preload puts in place of /sys:
simulated trees built here, and recordings of real machines (this host, the QEMU guest)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from petitkexec.bdf import Bdf
from petitkexec.model import Topology
from petitkexec.snapshot import snapshot_from_json
from tests.ci import in_ci
from tests.conftest import SimFactory
from tests.simkernel import SimFunction

RECORDINGS = Path(__file__).parent / "fixtures" / "umockdev"
PRELOAD = "libumockdev-preload.so.0"

pytestmark = pytest.mark.umockdev

if shutil.which("umockdev-run") is None and not in_ci():
    pytest.skip("umockdev is not installed (apt-get install umockdev)", allow_module_level=True)

SNAPSHOT = [sys.executable, "-m", "petitkexec", "snapshot"]


def snapshot_under_testbed(testbed: Path) -> Topology:
    """`petitkexec snapshot` in a child whose /sys is the simulated tree under `testbed`."""
    env = {**os.environ, "UMOCKDEV_DIR": str(testbed), "LD_PRELOAD": PRELOAD}
    done = subprocess.run(SNAPSHOT, env=env, capture_output=True, text=True, check=True)
    return snapshot_from_json(json.loads(done.stdout))[0]


def replay(
    recording: Path, command: list[str], without_unbind: frozenset[str] = frozenset()
) -> subprocess.CompletedProcess[str]:
    """Run `command` under umockdev-run with a recorded machine in place of /sys.

    umockdev records devices, not /sys/bus/pci/drivers/*: the driver directories are put back
    first, with the `unbind` file the kernel gives every driver except those in
    `without_unbind` (drivers that set suppress_bind_attrs get no bind/unbind files:
    bus_add_driver() skips add_bind_files()).
    """
    drivers = sorted(set(re.findall(r"^E: DRIVER=(\S+)$", recording.read_text(), re.M)))
    make_drivers = " ".join(
        f'mkdir -p "$UMOCKDEV_DIR/sys/bus/pci/drivers/{name}" &&'
        + (
            ""
            if name in without_unbind
            else f' touch "$UMOCKDEV_DIR/sys/bus/pci/drivers/{name}/unbind" &&'
        )
        for name in drivers
    )
    script = f'{make_drivers} exec "$@"'
    return subprocess.run(
        ["umockdev-run", "-d", str(recording), "--", "sh", "-c", script, "replay", *command],
        capture_output=True,
        text=True,
        check=True,
    )


def test_discovery_of_the_simulated_q35_tree_matches_what_was_built(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    discovered = snapshot_under_testbed(tmp_path)
    assert list(discovered) == list(sim.topology())


def test_discovery_knows_bridges_multifunction_and_vf_links(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    make_sim()
    topology = snapshot_under_testbed(tmp_path)
    nvme = Bdf.parse("0000:01:00.0")
    assert topology[Bdf.parse("0000:00:02.0")].is_bridge
    assert topology[nvme].is_multifunction
    assert topology.vfs(nvme) == (Bdf.parse("0000:01:00.1"), Bdf.parse("0000:01:00.2"))
    assert topology[Bdf.parse("0000:04:01.0")].parent == Bdf.parse("0000:00:02.3")
    assert not topology[Bdf.parse("0000:00:1f.0")].driver_can_unbind  # suppress_bind_attrs


def test_discovery_works_with_the_64_bytes_of_config_a_non_root_user_reads(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    for function in sim.functions:
        config = sim.device_dir(function.bdf) / "config"
        config.write_bytes(config.read_bytes()[:64])
    assert list(snapshot_under_testbed(tmp_path)) == list(sim.topology())


def test_discovery_with_unreadable_config_keeps_the_function_without_command(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    make_sim([SimFunction("0000:00:03.0", driver="e1000e")])
    (tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:03.0" / "config").unlink()
    function = snapshot_under_testbed(tmp_path)[Bdf.parse("0000:00:03.0")]
    assert function.command is None and function.driver == "e1000e"


def test_replayed_host_recording_has_its_virtio_functions() -> None:
    done = replay(RECORDINGS / "host.umockdev", SNAPSHOT)
    topology, _facts = snapshot_from_json(json.loads(done.stdout))
    assert [str(bdf) for bdf in topology.functions] == [
        "0000:00:00.0",
        "0000:00:01.0",
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:04.0",
        "0000:00:05.0",
    ]
    disk = topology[Bdf.parse("0000:00:02.0")]
    assert (disk.vendor_device, disk.class_code, disk.driver) == (
        "1af4:1042",
        0x018000,
        "virtio-pci",
    )
    # COMMAND comes from the recorded binary config, not pyudev's NUL-truncated copy
    assert disk.command == 0x0406 and disk.bus_master_on
    assert topology[Bdf.parse("0000:00:00.0")].driver is None


def test_replayed_host_plan_unbinds_the_virtio_functions() -> None:
    done = replay(
        RECORDINGS / "host.umockdev",
        [sys.executable, "-m", "petitkexec", "plan", "--json", "--exclude", "0000:00:02.0"],
    )
    steps = {step["bdf"]: step for step in json.loads(done.stdout)["steps"]}
    assert steps["0000:00:03.0"]["action"] == "unbind"
    assert steps["0000:00:03.0"]["reason"] == "virtio-pci, has unbind"
    assert steps["0000:00:00.0"]["action"] == "skip"


GUEST_BRIDGES = [
    "0000:00:02.0",
    "0000:00:03.0",
    "0000:00:04.0",
    "0000:00:05.0",
    "0000:00:06.0",
    "0000:00:07.0",
    "0000:00:0a.0",
    "0000:05:00.0",
]


def test_replayed_q35_guest_has_its_bridges_multifunction_device_and_drivers() -> None:
    from tests.vm.guest import EXPECTED_DRIVERS

    done = replay(RECORDINGS / "q35-guest.umockdev", SNAPSHOT)
    topology, _facts = snapshot_from_json(json.loads(done.stdout))
    assert {str(f.bdf): f.driver for f in topology} == EXPECTED_DRIVERS
    assert sorted(str(f.bdf) for f in topology if f.is_bridge) == GUEST_BRIDGES
    assert topology[Bdf.parse("0000:06:01.0")].parent == Bdf.parse("0000:05:00.0")
    assert topology[Bdf.parse("0000:05:00.0")].parent == Bdf.parse("0000:00:06.0")
    assert topology[Bdf.parse("0000:07:00.0")].is_multifunction
    assert topology[Bdf.parse("0000:05:00.0")].command == 0x0107  # no driver, bus master on


def test_replayed_q35_guest_with_sriov_plans_the_vfs_before_their_pf() -> None:
    done = replay(
        RECORDINGS / "q35-guest-sriov.umockdev",
        [sys.executable, "-m", "petitkexec", "plan", "--json"],
    )
    order = [step["bdf"] for step in json.loads(done.stdout)["steps"]]
    assert order[:2] == ["0000:01:00.1", "0000:01:00.2"]
    assert order.index("0000:01:00.0") < order.index("0000:00:02.0")
    done = replay(RECORDINGS / "q35-guest-sriov.umockdev", SNAPSHOT)
    topology, _facts = snapshot_from_json(json.loads(done.stdout))
    assert topology.vfs(Bdf.parse("0000:01:00.0")) == (
        Bdf.parse("0000:01:00.1"),
        Bdf.parse("0000:01:00.2"),
    )


def test_replayed_guest_functions_whose_driver_has_no_unbind_get_bus_master_cleared() -> None:
    # No driver in the recorded guests sets suppress_bind_attrs, so e1000e is replayed as
    # one that does: its functions' recorded COMMAND decides between clear and skip.
    done = replay(
        RECORDINGS / "q35-guest.umockdev",
        [sys.executable, "-m", "petitkexec", "plan", "--json"],
        without_unbind=frozenset({"e1000e"}),
    )
    steps = {
        step["bdf"]: (step["action"], step["reason"]) for step in json.loads(done.stdout)["steps"]
    }
    for nic in ("0000:02:00.0", "0000:07:00.0"):
        assert steps[nic] == ("clear-bus-master", "e1000e cannot be unbound, BME on")
    assert steps["0000:06:01.0"] == ("unbind", "e1000, has unbind")
    done = replay(RECORDINGS / "q35-guest.umockdev", SNAPSHOT, frozenset({"e1000e"}))
    topology, _facts = snapshot_from_json(json.loads(done.stdout))
    assert not topology[Bdf.parse("0000:02:00.0")].driver_can_unbind
    assert topology[Bdf.parse("0000:02:00.0")].driver == "e1000e"
    assert topology[Bdf.parse("0000:06:01.0")].driver_can_unbind
