"""Where petitkexec's start-up goes, in instructions: deterministic, so a change can be judged on
a machine shared with others (wall and CPU time are not).

    python bench/startup_instructions.py [--python PATH]     # needs valgrind

Each phase is a whole process, counted by valgrind's cachegrind ("I refs", every user-space
instruction, cache simulation off) after one warm-up run that writes the bytecode
(PYTHONPYCACHEPREFIX in a temporary folder, so bytecode is in place for every count even where
PYTHONDONTWRITEBYTECODE is set). The phases are cumulative: each row's extra over the one
above is what that phase adds. `plan` reads this machine's /sys and /proc (read-only).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "tests" / "fixtures" / "snapshot-q35.json"
# (phase, the python arguments that run everything up to and including it)
PHASES: tuple[tuple[str, list[str]], ...] = (
    ("interpreter (`-c pass`)", ["-c", "pass"]),
    ("click and its imports", ["-c", "import click"]),
    ("petitkexec.cli imported", ["-c", "import petitkexec.cli"]),
    ("`plan --snapshot` (no discovery)", ["-m", "petitkexec", "plan", "--snapshot", str(SNAPSHOT)]),
    (
        "+ discovery modules and pyudev imported",
        ["-c", "import petitkexec.cli, petitkexec.discovery, petitkexec.facts, pyudev"],
    ),
    ("`plan` (discovery, /proc walk, plan, render)", ["-m", "petitkexec", "plan"]),
)
# A diagnostic, not a phase: the modules `plan` imports, loaded once as they are and once with
# dataclasses.dataclass made a no-op after their dependencies are in: the difference is what
# creating petitkexec's frozen dataclasses costs (Python 3.11 compiles each generated method,
# __init__, __repr__, __eq__, __hash__, __setattr__, __delattr__, with its own exec()).
DEPENDENCIES = "import click, dataclasses, pathlib, ctypes.util, pyudev, locale, gettext\n"
NO_DATACLASSES = (
    "def _plain(cls=None, **options):\n"
    "    return (lambda c: c) if cls is None else cls\n"
    "dataclasses.dataclass = _plain\n"
)
OWN_MODULES = (
    "import petitkexec.cli, petitkexec.discovery, petitkexec.facts, petitkexec.plan, "
    "petitkexec.render\n"
)


def instructions(python: str, args: list[str], env: dict[str, str]) -> int:
    subprocess.run([python, *args], env=env, capture_output=True)  # writes the bytecode
    done = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            python,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count for {args}:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        counts = [(name, instructions(args.python, a, env)) for name, a in PHASES]
        deps, own, plain = (
            instructions(args.python, ["-c", code], env)
            for code in (
                DEPENDENCIES,
                DEPENDENCIES + OWN_MODULES,
                DEPENDENCIES + NO_DATACLASSES + OWN_MODULES,
            )
        )
    bare = counts[0][1]
    print(f"{'phase (cumulative)':<48} {'instructions':>14} {'over bare':>12}")
    for name, count in counts:
        print(f"{name:<48} {count / 1e6:>12.1f} M {(count - bare) / 1e6:>10.1f} M")
    print(
        f"petitkexec's own modules over their dependencies: {(own - deps) / 1e6:.1f} M, "
        f"of which creating their dataclasses {(own - plain) / 1e6:.1f} M"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
