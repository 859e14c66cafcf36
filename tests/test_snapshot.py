"""Snapshots: (topology, facts) as versioned JSON, so a plan can be made on another machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from petitkexec import __version__
from petitkexec.bdf import Bdf
from petitkexec.errors import ExitCode, SnapshotError
from petitkexec.model import PciFunction, SystemFacts, Topology
from petitkexec.plan import build_plan
from petitkexec.policy import Policy
from petitkexec.snapshot import (
    FORMAT,
    VERSION,
    load_snapshot,
    snapshot_from_json,
    snapshot_to_json,
)
from tests.strategies import Scenario, scenarios

B = Bdf.parse


def sample() -> tuple[Topology, SystemFacts]:
    functions = [
        PciFunction(B("0000:00:00.0"), 0x8086, 0x29C0, 0x060000, 0x00, 0x0000),
        PciFunction(
            B("0000:00:1c.0"),
            0x8086,
            0x9D10,
            0x060400,
            0x81,
            0x0407,
            driver="pcieport",
            driver_can_unbind=True,
            enabled=True,
            has_reset_subordinate=True,
        ),
        PciFunction(
            B("0000:01:00.0"),
            0x15B3,
            0x1017,
            0x020000,
            0x80,
            0x0406,
            driver="mlx5_core",
            driver_can_unbind=True,
            driver_override=None,
            parent=B("0000:00:1c.0"),
            enabled=True,
            reset_methods=("flr", "bus"),
            has_reset=True,
        ),
        PciFunction(
            B("0000:01:00.1"),
            0x15B3,
            0x1018,
            0x020000,
            0x00,
            0x0000,
            driver="vfio-pci",
            driver_override="vfio-pci",
            parent=B("0000:00:1c.0"),
            physfn=B("0000:01:00.0"),
            enabled=False,
        ),
        PciFunction(B("0001:00:02.0"), 0x1234, 0x1111, 0x030000, None, None),
    ]
    facts = SystemFacts(
        needed={B("0000:01:00.0"): "backs / mounted rw", B("0001:00:02.0"): "console tty0"},
        lockdown="integrity",
        kexec_loaded=True,
    )
    return Topology.from_functions(functions), facts


def test_topology_and_facts_round_trip_through_json_text() -> None:
    topology, facts = sample()
    text = json.dumps(snapshot_to_json(topology, facts))
    again_topology, again_facts = snapshot_from_json(json.loads(text))
    assert again_topology == topology
    assert again_facts == facts
    assert list(again_topology) == list(topology)
    assert again_topology.vfs(B("0000:01:00.0")) == (B("0000:01:00.1"),)
    assert again_topology.children(B("0000:00:1c.0")) == (B("0000:01:00.0"), B("0000:01:00.1"))


def test_a_snapshot_names_its_format_version_and_writer() -> None:
    data = snapshot_to_json(*sample())
    assert (data["format"], data["version"], data["petitkexec"]) == (FORMAT, VERSION, __version__)
    assert data["functions"][2]["vendor"] == "15b3"
    assert data["functions"][2]["class"] == "020000"
    assert data["facts"]["needed"] == {
        "0000:01:00.0": "backs / mounted rw",
        "0001:00:02.0": "console tty0",
    }


def test_load_snapshot_reads_a_written_file(tmp_path: Path) -> None:
    topology, facts = sample()
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(snapshot_to_json(topology, facts), indent=2))
    assert load_snapshot(path) == (topology, facts)


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_a_plan_from_a_snapshot_is_the_plan_from_the_machine(scenario: Scenario) -> None:
    data = json.loads(json.dumps(snapshot_to_json(scenario.topology, scenario.facts)))
    topology, facts = snapshot_from_json(data)
    assert (topology, facts) == (scenario.topology, scenario.facts)
    policy = Policy(hot_reset=True)
    assert build_plan(topology, policy, facts) == build_plan(
        scenario.topology, policy, scenario.facts
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("data", [{"format": "something-else", "version": 1}, [], "x", None])
def test_a_file_of_another_format_is_a_snapshot_error_naming_the_path(
    tmp_path: Path, data: Any
) -> None:
    path = write_json(tmp_path / "other.json", data)
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert str(raised.value) == f"{path}: is not a petitkexec-snapshot file"
    assert raised.value.path == str(path)
    assert raised.value.exit_code is ExitCode.USAGE


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_another_version_is_a_snapshot_error_naming_path_and_version(
    tmp_path: Path, version: object
) -> None:
    data = snapshot_to_json(*sample())
    data["version"] = version
    path = write_json(tmp_path / "future.json", data)
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert str(raised.value) == (
        f"{path}: has version {version!r}; this petitkexec reads version {VERSION}"
    )


def test_text_that_is_not_json_is_a_snapshot_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.json"
    path.write_text("{not json at all")
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert str(raised.value).startswith(f"{path}: is not JSON (")


def test_binary_garbage_is_a_snapshot_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert raised.value.path == str(path)


def test_a_missing_file_is_a_snapshot_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert str(raised.value) == f"{path}: cannot be read (No such file or directory)"


def test_a_function_missing_a_field_is_malformed(tmp_path: Path) -> None:
    data = snapshot_to_json(*sample())
    del data["functions"][1]["command"]
    path = write_json(tmp_path / "s.json", data)
    with pytest.raises(SnapshotError) as raised:
        load_snapshot(path)
    assert str(raised.value) == f"{path}: is malformed (KeyError: 'command')"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d.update(functions=None), id="functions-null"),
        pytest.param(lambda d: d["functions"][0].update(bdf="0000:00:20.0"), id="bad-bdf"),
        pytest.param(lambda d: d["functions"][0].update(vendor=32902), id="vendor-number"),
        pytest.param(lambda d: d.update(facts=[]), id="facts-list"),
        pytest.param(lambda d: d["facts"].update(needed={"zz": "x"}), id="needed-bad-bdf"),
        pytest.param(lambda d: d["facts"].update(needed=[]), id="needed-list"),
        pytest.param(lambda d: d["functions"][0].update(bdf=0), id="bdf-number"),
    ],
)
def test_a_damaged_snapshot_is_a_snapshot_error_naming_the_path(damage: Any) -> None:
    data = snapshot_to_json(*sample())
    damage(data)
    with pytest.raises(SnapshotError) as raised:
        snapshot_from_json(data, "/tmp/sent-by-user.json")
    assert str(raised.value).startswith("/tmp/sent-by-user.json: is malformed (")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("command", "0x0406"),  # would reach the plan as a str and fail there
        ("header_type", "01"),
        ("reset_methods", "flr bus"),  # would become ('f', 'l', 'r', ' ', 'b', 'u', 's')
        ("driver_can_unbind", "no"),  # would become True
    ],
)
def test_a_field_of_the_wrong_type_is_malformed(field: str, value: object) -> None:
    data = snapshot_to_json(*sample())
    data["functions"][2][field] = value
    with pytest.raises(SnapshotError) as raised:
        snapshot_from_json(data, "sent.json")
    assert str(raised.value).startswith("sent.json: is malformed (")
