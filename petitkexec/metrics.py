"""What a teardown did and what `verify` found, in node_exporter's textfile format, for a
fleet's dashboards (`--metrics FILE`).

node_exporter's textfile collector reads every `*.prom` file of its directory at each scrape.
A file it read half-written would be a wrong sample, so the file is written under a temporary
name in the same directory (same file system: the rename is atomic) and renamed over the old
one, as node_exporter's documentation asks. Each file is rewritten whole by the run it
describes: its numbers are gauges of that run, not counters (no `_total`: Prometheus keeps
`_total` for counters that only go up).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from petitkexec.outcome import Status, TeardownReport
from petitkexec.verify import Change, Difference

SUFFIX = ".prom"  # the only files the textfile collector reads


@dataclass(frozen=True)
class Metric:
    """One metric family: its HELP and TYPE lines and its samples (label text, value)."""

    name: str
    help: str
    samples: tuple[tuple[str, float], ...]
    type: str = "gauge"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(round(value, 3))


def render(metrics: Iterable[Metric]) -> str:
    lines = []
    for metric in metrics:
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.type}"]
        lines += [f"{metric.name}{labels} {_number(value)}" for labels, value in metric.samples]
    return "\n".join(lines) + "\n"


def verify_metrics(
    functions: int, differences: Iterable[Difference], seconds: float, finished_at: float
) -> tuple[Metric, ...]:
    """`functions` in the snapshot; the differences verify found; how long it looked; when
    it finished (Unix time)."""
    found = list(differences)
    return (
        Metric(
            "petitkexec_verify_functions",
            "PCI functions in the snapshot taken before the kexec.",
            (("", functions),),
        ),
        Metric(
            "petitkexec_verify_functions_not_back",
            "PCI functions of the snapshot not back as they were after the kexec, by change.",
            tuple(
                (f'{{change="{change.value}"}}', sum(d.change is change for d in found))
                for change in Change
                if change.is_failure
            ),
        ),
        Metric(
            "petitkexec_verify_duration_seconds",
            "How long verify looked (waiting for drivers still probing included).",
            (("", seconds),),
        ),
        Metric(
            "petitkexec_verify_last_run_timestamp_seconds",
            "When verify last ran (Unix time).",
            (("", finished_at),),
        ),
    )


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a temporary file in its directory, renamed),
    durably: `exec` writes right before the handoff, and the kernel does not sync file systems
    at a kexec (kernel_kexec() goes from device_shutdown() to machine_kexec(); with --syscall
    nothing else does either), so the file and the directory's new entry are flushed here."""
    # The temporary name does not end in .prom: the collector never reads it half-written.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600: node_exporter usually runs as its own user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def teardown_metrics(report: TeardownReport, finished_at: float) -> tuple[Metric, ...]:
    """A teardown's wall time and its steps by how each ended; when it finished (Unix time)."""
    return (
        Metric(
            "petitkexec_teardown_duration_seconds",
            "How long the last teardown took (wall time).",
            (("", report.wall_ms / 1000),),
        ),
        Metric(
            "petitkexec_teardown_steps",
            "Steps of the last teardown by how they ended (failed and hung: see its report).",
            tuple(
                (f'{{status="{status.value}"}}', sum(o.status is status for o in report.outcomes))
                for status in Status
            ),
        ),
        Metric(
            "petitkexec_teardown_last_run_timestamp_seconds",
            "When the last teardown finished (Unix time).",
            (("", finished_at),),
        ),
    )
