"""Start-up of petitkexec.pyz with bytecode inside against sources only, in one run.

Builds the archive three ways into a temporary directory (sources + .pyc, the default; .pyc
only; sources only), then times `python3 -I petitkexec.pyz plan --snapshot
tests/fixtures/snapshot-q35.json` for each, and `python3 -I -c pass` for the interpreter
alone, round-robin so that load on the machine falls on all alike. Prints medians and ratios,
and whether the bytecode was in place (an audit hook counts modules compiled from source):
    python bench/zipapp_startup.py [--runs N] [--python-version X.Y] [--python PATH]

zipimport never writes bytecode, so without .pyc inside every start compiles every module it
imports; the ratio printed is what carrying bytecode saves at each start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import build_zipapp

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "fixtures" / "snapshot-q35.json"
VARIANTS = {
    "sources + .pyc": {"sources": True, "bytecode": True},
    ".pyc only": {"sources": False, "bytecode": True},
    "sources only": {"sources": True, "bytecode": False},
}
# Counts the modules compiled from source out of the archive during one start.
COUNT_COMPILED = r"""
import runpy, sys
archive = sys.argv[1]
compiled = []
sys.addaudithook(
    lambda event, args: event == "compile" and isinstance(args[1], str)
    and args[1].startswith(archive) and compiled.append(args[1])
)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(archive, run_name="__main__")
except SystemExit:
    pass
sys.stderr.write("\ncompiled %d\n" % len(compiled))
"""


def interpreter(version: str, given: str | None) -> str:
    """The target's python3 as the guest has it (Debian's /usr/bin/python3.X) when there is
    one, else whatever the build script finds."""
    if given:
        return given
    system = f"/usr/bin/python{version}"
    if os.access(system, os.X_OK) and build_zipapp.interpreter_version(system) == version:
        return system
    return build_zipapp.find_python(version)


def isolation_flags(python: str) -> list[str]:
    """-I as the target runs it; plus -S where this interpreter's site-packages hold petitkexec
    or a dependency (a venv, an editable install): they must come from the archive."""
    for module in ("petitkexec", "click", "structlog", "pyudev"):
        found = subprocess.run(
            [
                python,
                "-I",
                "-c",
                f"import importlib.util; exit(not importlib.util.find_spec({module!r}))",
            ],
            capture_output=True,
        )
        if found.returncode == 0:
            return ["-I", "-S"]
    return ["-I"]


def elapsed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - started


def compiled_at_start(python: str, flags: list[str], archive: Path, cwd: Path) -> int:
    done = subprocess.run(
        [python, *flags, "-c", COUNT_COMPILED, str(archive), "plan", "--snapshot", str(SNAPSHOT)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stderr.rsplit("compiled ", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--python-version", default=build_zipapp.DEFAULT_PYTHON_VERSION)
    parser.add_argument("--python", help="the interpreter to build for and run with")
    args = parser.parse_args()
    python = interpreter(args.python_version, args.python)
    flags = isolation_flags(python)
    with tempfile.TemporaryDirectory(prefix="zipapp-startup-") as temporary:
        root = Path(temporary)
        archives: dict[str, Path] = {}
        for name, options in VARIANTS.items():
            archive = root / name.replace(" ", "").replace("+", "-") / "petitkexec.pyz"
            build_zipapp.build(
                archive,
                python_version=args.python_version,
                python=python,
                wheels=root / "wheels",
                **options,
            )
            archives[name] = archive
        commands = {
            "python3 -I -c pass": [python, *flags, "-c", "pass"],
            **{
                name: [python, *flags, str(archive), "plan", "--snapshot", str(SNAPSHOT)]
                for name, archive in archives.items()
            },
        }
        for command in commands.values():  # warm the page cache, and fail early
            elapsed(command, root)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(elapsed(command, root))
        medians = {name: statistics.median(values) for name, values in times.items()}
        compiled = {name: compiled_at_start(python, flags, a, root) for name, a in archives.items()}
        sizes = {name: archive.stat().st_size for name, archive in archives.items()}

    print(
        f"{python} {' '.join(flags)} (Python {args.python_version}), {args.runs} runs each, "
        "medians of this one run:"
    )
    baseline = medians["python3 -I -c pass"]
    print(f"  {'python3 -I -c pass':<38} {baseline * 1000:8.1f} ms")
    for name in archives:
        state = (
            "bytecode in place: nothing compiled"
            if compiled[name] == 0
            else f"no bytecode in place: {compiled[name]} modules compiled at start"
        )
        print(
            f"  {'plan --snapshot, ' + name:<38} {medians[name] * 1000:8.1f} ms"
            f"  ({medians[name] / baseline:4.1f}x the bare interpreter; "
            f"{sizes[name] / 1024:.0f} KiB; {state})"
        )
    with_pyc, pyc_only, sources = (medians[name] for name in VARIANTS)
    beyond = (sources - baseline) / (with_pyc - baseline)
    print(
        f"sources only / sources + .pyc: {sources / with_pyc:.2f}x; "
        f"sources only / .pyc only: {sources / pyc_only:.2f}x; "
        f"start-up beyond the interpreter: {(with_pyc - baseline) * 1000:.0f} ms with .pyc, "
        f"{(sources - baseline) * 1000:.0f} ms without ({beyond:.2f}x)"
    )


if __name__ == "__main__":
    main()
