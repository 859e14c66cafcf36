"""What appears between the busy scan and the teardown (a disk mounted while `kexec -l`
runs) is protected, and the report says it appeared after the scan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petitkexec.blockdev import resolve_link
from petitkexec.environment import Environment
from petitkexec.errors import ExitCode
from tests.clirun import ROOT_MOUNT, environment, invoke, shell_script
from tests.conftest import SimFactory

NVME = "0000:01:00.0"


def test_a_disk_mounted_during_the_load_is_protected_and_the_report_says_so(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    sim = make_sim(kexec_loaded=False)
    disk = Path(resolve_link(sim.device_dir(NVME))) / "nvme" / "nvme0" / "nvme0n1"
    disk.mkdir(parents=True)
    (sim.root / "dev" / "block").mkdir(parents=True)
    (sim.root / "dev" / "block" / "259:0").symlink_to(disk)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    env = environment(sim, tmp_path)
    mountinfo = env.proc_root / "self" / "mountinfo"
    # The load step is where time passes: something mounts the disk meanwhile.
    kexec = shell_script(
        tmp_path / "kexec-mounting",
        f'if [ "$1" = -l ]; then echo "40 22 259:0 / /data rw - ext4 /dev/nvme0n1 rw"'
        f" >> {mountinfo}; exit 0; fi\n"
        f"ls {sim.root}/bus/pci/devices/{NVME}/driver > {tmp_path}/nvme-driver-at-handoff\n"
        "exit 1\n",
    )
    result = invoke(env, "exec", "--json", "--kexec", str(kexec), "--load", str(kernel))
    assert mountinfo.read_text() != ROOT_MOUNT  # the load did mount it
    assert result.exit_code == ExitCode.HANDOFF_FAILED
    assert (tmp_path / "nvme-driver-at-handoff").exists()  # still bound at the handoff
    assert sim.driver_of(NVME) == "nvme"
    steps = {step["bdf"]: step for step in json.loads(result.stdout)["steps"]}
    assert steps[NVME]["action"] == "protect"
    assert steps[NVME]["detail"] == "appeared after the scan: backs /data mounted rw"
    assert json.loads(result.stdout)["handoff"] == "failed"
    warnings = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [(w["event"], w["functions"]) for w in warnings] == [
        ("needed since the scan", [f"{NVME}: appeared after the scan: backs /data mounted rw"])
    ]


def test_a_dry_run_scans_once_and_shows_the_plan_of_that_scan(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dry run touches nothing, so nothing can need protecting from it: the scan of every
    # process's open files and mounts (the slow part on a big machine) is not done twice.
    scans: list[int] = []
    facts = Environment.facts

    def counted(self: Environment) -> object:
        scans.append(1)
        return facts(self)

    monkeypatch.setattr(Environment, "facts", counted)
    result = invoke(environment(make_sim(), tmp_path), "teardown", "--dry-run")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert len(scans) == 1
