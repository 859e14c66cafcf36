"""verify: every function of the snapshot back, with the driver it had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petitkexec import verify
from petitkexec.errors import ExitCode
from petitkexec.model import Topology
from petitkexec.verify import Change, compare, verify_until
from tests.builders import bridge, endpoint
from tests.clirun import environment, invoke
from tests.conftest import SimFactory

BEFORE = Topology.from_functions(
    [
        bridge("0000:00:1c.0"),
        endpoint("0000:01:00.0", "nvme", parent="0000:00:1c.0"),
        endpoint("0000:00:14.0", "xhci_hcd"),
        endpoint("0000:00:1f.3", None),
    ]
)


def changes(after: list[object]) -> dict[str, Change]:
    return {str(d.bdf): d.change for d in compare(BEFORE, Topology.from_functions(after))}  # type: ignore[arg-type]


def test_the_same_topology_has_no_differences() -> None:
    assert compare(BEFORE, BEFORE) == ()


def test_a_missing_an_unbound_and_a_rebound_function_are_each_named() -> None:
    after = [
        bridge("0000:00:1c.0"),
        endpoint("0000:01:00.0", None, parent="0000:00:1c.0"),  # the nvme driver did not probe
        endpoint("0000:00:1f.3", "i801_smbus"),  # had no driver: any driver now is fine
        endpoint("0000:00:14.0", "vfio-pci", vendor=0x1B36),
    ]
    assert changes(after) == {
        "0000:01:00.0": Change.UNBOUND,
        "0000:00:14.0": Change.OTHER_DRIVER,
    }
    assert changes(after[:2]) == {
        "0000:01:00.0": Change.UNBOUND,
        "0000:00:14.0": Change.MISSING,
        "0000:00:1f.3": Change.MISSING,
    }


def test_a_new_function_is_reported_but_is_not_a_failure() -> None:
    after = [*BEFORE, endpoint("0000:02:00.0", "e1000e")]
    (difference,) = compare(BEFORE, Topology.from_functions(after))
    assert difference.change is Change.NEW and not difference.change.is_failure


def test_verify_against_a_snapshot_of_the_same_machine_passes(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    env = environment(make_sim(), tmp_path)
    snapshot = tmp_path / "before.json"
    assert invoke(env, "snapshot", "-o", str(snapshot)).exit_code == 0
    result = invoke(env, "verify", "--against", str(snapshot), "--json")
    assert result.exit_code == ExitCode.OK
    assert json.loads(result.stdout)["back"] is True
    assert "all 16 functions back as they were" in result.stderr


def test_verify_names_a_function_whose_driver_did_not_come_back(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim()
    env = environment(sim, tmp_path)
    snapshot = tmp_path / "before.json"
    invoke(env, "snapshot", "-o", str(snapshot))
    # `none` first, or "udev" binds it again at once (SimKernel.autoprobe)
    sim.write(sim.device_dir("0000:02:00.0") / "driver_override", b"none")
    sim.write(sim.root / "bus/pci/drivers/e1000e/unbind", b"0000:02:00.0")
    result = invoke(env, "verify", "--against", str(snapshot), "--json")
    assert result.exit_code == ExitCode.NOT_BACK
    differences = json.loads(result.stdout)["differences"]
    assert differences == [
        {"bdf": "0000:02:00.0", "change": "unbound", "before": "e1000e", "after": None}
    ]
    assert "0000:02:00.0 unbound (was bound to e1000e)" in result.stderr


class FakeClock:
    """time.monotonic and time.sleep for verify_until: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(verify.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(verify.time, "sleep", fake.sleep)
    return fake


NVME_NOT_BACK = Topology.from_functions(
    [
        bridge("0000:00:1c.0"),
        endpoint("0000:01:00.0", None, parent="0000:00:1c.0"),
        endpoint("0000:00:14.0", "xhci_hcd"),
        endpoint("0000:00:1f.3", None),
    ]
)


def test_waiting_stops_as_soon_as_the_driver_is_back(clock: FakeClock) -> None:
    looks = iter([NVME_NOT_BACK, NVME_NOT_BACK, NVME_NOT_BACK, BEFORE])
    assert verify_until(lambda: next(looks), BEFORE, wait_s=60) == ()
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_a_driver_that_never_comes_back_is_looked_for_less_often_until_the_wait_ends(
    clock: FakeClock,
) -> None:
    looks: list[Topology] = []

    def discover() -> Topology:
        looks.append(NVME_NOT_BACK)
        return NVME_NOT_BACK

    differences = verify_until(discover, BEFORE, wait_s=60)
    assert [str(d.bdf) for d in differences if d.change.is_failure] == ["0000:01:00.0"]
    assert clock.now == 60  # the last pause is cut to what is left of the wait
    assert max(clock.sleeps) == verify.POLL_MAX_S
    assert clock.sleeps == sorted(clock.sleeps[:-1]) + clock.sleeps[-1:]
    assert len(looks) == len(clock.sleeps) + 1 < 60 / verify.POLL_S
