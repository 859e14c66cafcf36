"""verify's result in node_exporter's textfile format (petitkexec/metrics.py, `--metrics`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from petitkexec import metrics
from petitkexec.bdf import Bdf
from petitkexec.errors import ExitCode
from petitkexec.outcome import Status, StepOutcome, TeardownReport
from petitkexec.plan import Action, Step
from petitkexec.verify import Change, Difference
from tests.clirun import environment, invoke, shell_script
from tests.conftest import SimFactory

EXPECTED_AFTER_A_MISSING_DRIVER = """\
# HELP petitkexec_verify_functions PCI functions in the snapshot taken before the kexec.
# TYPE petitkexec_verify_functions gauge
petitkexec_verify_functions 16
# HELP petitkexec_verify_functions_not_back PCI functions of the snapshot not back as they were after the kexec, by change.
# TYPE petitkexec_verify_functions_not_back gauge
petitkexec_verify_functions_not_back{change="missing"} 0
petitkexec_verify_functions_not_back{change="unbound"} 1
petitkexec_verify_functions_not_back{change="other-driver"} 0
# HELP petitkexec_verify_duration_seconds How long verify looked (waiting for drivers still probing included).
# TYPE petitkexec_verify_duration_seconds gauge
petitkexec_verify_duration_seconds 60.25
# HELP petitkexec_verify_last_run_timestamp_seconds When verify last ran (Unix time).
# TYPE petitkexec_verify_last_run_timestamp_seconds gauge
petitkexec_verify_last_run_timestamp_seconds 1796000000
"""  # noqa: E501 - HELP lines are one line each in the format


def test_the_text_node_exporter_reads() -> None:
    differences = (
        Difference(Bdf.parse("0000:02:00.0"), Change.UNBOUND, "e1000e", None),
        Difference(Bdf.parse("0000:05:00.0"), Change.NEW, None, "nvme"),  # not a failure
    )
    found = metrics.verify_metrics(16, differences, 60.25, 1796000000.0)
    assert metrics.render(found) == EXPECTED_AFTER_A_MISSING_DRIVER


def test_the_file_is_replaced_whole_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "petitkexec.prom"
    target.write_text("old\n")
    metrics.write_textfile(target, "new\n")
    assert target.read_text() == "new\n"
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["petitkexec.prom"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "petitkexec.prom"
    target.write_text("old\n")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        metrics.write_textfile(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["petitkexec.prom"]


def test_verify_writes_its_metrics_when_asked(make_sim: SimFactory, tmp_path: Path) -> None:
    sim = make_sim()
    env = environment(sim, tmp_path)
    snapshot = tmp_path / "before.json"
    invoke(env, "snapshot", "-o", str(snapshot))
    # `none` first, or "udev" binds it again at once (SimKernel.autoprobe)
    sim.write(sim.device_dir("0000:02:00.0") / "driver_override", b"none")
    sim.write(sim.root / "bus/pci/drivers/e1000e/unbind", b"0000:02:00.0")
    textfile = tmp_path / "textfile" / "petitkexec.prom"
    textfile.parent.mkdir()
    result = invoke(env, "verify", "--against", str(snapshot), "--metrics", str(textfile))
    assert result.exit_code == ExitCode.NOT_BACK
    text = textfile.read_text()
    assert "petitkexec_verify_functions 16\n" in text
    assert 'petitkexec_verify_functions_not_back{change="unbound"} 1\n' in text


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("petitkexec.txt", "must end in .prom"),
        ("no-such-dir/petitkexec.prom", "is in a directory that does not exist"),
    ],
)
def test_a_textfile_node_exporter_would_never_read_is_a_usage_error(
    make_sim: SimFactory, tmp_path: Path, name: str, problem: str
) -> None:
    env = environment(make_sim(), tmp_path)
    snapshot = tmp_path / "before.json"
    invoke(env, "snapshot", "-o", str(snapshot))
    result = invoke(env, "verify", "--against", str(snapshot), "--metrics", str(tmp_path / name))
    assert result.exit_code == ExitCode.USAGE
    assert problem in result.stderr and "--metrics" in result.stderr


EXPECTED_TEARDOWN = """\
# HELP petitkexec_teardown_duration_seconds How long the last teardown took (wall time).
# TYPE petitkexec_teardown_duration_seconds gauge
petitkexec_teardown_duration_seconds 5.432
# HELP petitkexec_teardown_steps Steps of the last teardown by how they ended (failed and hung: see its report).
# TYPE petitkexec_teardown_steps gauge
petitkexec_teardown_steps{status="done"} 2
petitkexec_teardown_steps{status="already"} 0
petitkexec_teardown_steps{status="held"} 0
petitkexec_teardown_steps{status="gone"} 0
petitkexec_teardown_steps{status="failed"} 0
petitkexec_teardown_steps{status="hung"} 1
petitkexec_teardown_steps{status="would"} 0
# HELP petitkexec_teardown_last_run_timestamp_seconds When the last teardown finished (Unix time).
# TYPE petitkexec_teardown_last_run_timestamp_seconds gauge
petitkexec_teardown_last_run_timestamp_seconds 1796000000.5
"""  # noqa: E501 - HELP lines are one line each in the format


def test_the_teardown_text_node_exporter_reads() -> None:
    report = TeardownReport(
        outcomes=tuple(
            StepOutcome(Step(Bdf.parse(bdf), Action.UNBIND, "test"), status, "", 10.0)
            for bdf, status in (
                ("0000:01:00.0", Status.DONE),
                ("0000:02:00.0", Status.DONE),
                ("0000:03:00.0", Status.HUNG),
            )
        ),
        wall_ms=5432.0,
    )
    found = metrics.teardown_metrics(report, 1796000000.5)
    assert metrics.render(found) == EXPECTED_TEARDOWN


def test_exec_writes_the_teardown_metrics_before_it_hands_off(
    make_sim: SimFactory, tmp_path: Path
) -> None:
    """The file must be there when kexec runs: after it, nothing of this boot is."""
    sim = make_sim()
    textfile = tmp_path / "petitkexec-teardown.prom"
    kexec = shell_script(tmp_path / "kexec", f"cp {textfile} {tmp_path}/at-handoff\nexit 1\n")
    result = invoke(
        environment(sim, tmp_path), "exec", "--kexec", str(kexec), "--metrics", str(textfile)
    )
    assert result.exit_code == ExitCode.HANDOFF_FAILED  # the stand-in kexec returned
    at_handoff = (tmp_path / "at-handoff").read_text()
    assert 'petitkexec_teardown_steps{status="failed"} 0\n' in at_handoff
    assert "petitkexec_teardown_duration_seconds " in at_handoff


def test_teardown_writes_its_metrics(make_sim: SimFactory, tmp_path: Path) -> None:
    textfile = tmp_path / "petitkexec-teardown.prom"
    result = invoke(environment(make_sim(), tmp_path), "teardown", "--metrics", str(textfile))
    assert result.exit_code in (ExitCode.OK, ExitCode.TEARDOWN_PARTIAL), result.stderr
    assert 'petitkexec_teardown_steps{status="hung"} 0\n' in textfile.read_text()


def test_a_metrics_file_that_cannot_be_written_is_one_line_and_changes_no_exit_code(
    make_sim: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_sim()
    env = environment(sim, tmp_path)
    snapshot = tmp_path / "before.json"
    invoke(env, "snapshot", "-o", str(snapshot))

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(metrics.tempfile, "mkstemp", read_only)
    textfile = tmp_path / "petitkexec.prom"
    result = invoke(env, "verify", "--against", str(snapshot), "--metrics", str(textfile))
    assert result.exit_code == ExitCode.OK
    assert f"--metrics {textfile}: not written (Read-only file system)" in result.stderr
    assert "Traceback" not in result.stderr
