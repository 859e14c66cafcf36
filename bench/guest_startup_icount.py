"""petitkexec's start-up in guest instructions: the q35 lane image under QEMU's `-icount`.

With `-icount shift=0` QEMU's virtual clock advances one nanosecond per guest instruction,
and the guest's clocks follow it: a CLOCK_MONOTONIC difference inside the guest is an
instruction count (kernel and user space, the same run after run: `sleep=off` lets the
virtual clock jump over idle time instead of following the host's). So, unlike the host's
valgrind count (bench/startup_instructions.py), this counts the real guest: Debian's
python3.11 from the lane image, its initramfs, its /sys and /proc.

One boot. A probe (python, in the guest) starts each phase as a whole process, like the host
bench, REPEAT times after one warm-up run that writes the bytecode, and prints the median.
The last phase is `exec --kexec /bin/false` from its start to its first write under /sys
(an audit hook in the child, installed before runpy runs petitkexec as `-m` does: the first
write is the first step's unbind or config write); the kexec then fails and petitkexec rolls
back. With `--before REF`, the same phases run against petitkexec as it was at REF too (its
package put ahead on PYTHONPATH), in the same boot:

    python bench/guest_startup_icount.py [--before REF] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm.guest import boot_guest

REPO = Path(__file__).resolve().parents[1]
BEFORE_DIR = "/opt/before"
PROBE = "/opt/startup-probe.py"
ICOUNT = ["-icount", "shift=0,sleep=off"]

# (phase, python arguments): cumulative, as in bench/startup_instructions.py.
PHASES: tuple[tuple[str, list[str]], ...] = (
    ("interpreter (`-c pass`)", ["-c", "pass"]),
    ("click imported", ["-c", "import click"]),
    ("petitkexec.cli imported", ["-c", "import petitkexec.cli"]),
    (
        "+ discovery, facts, pyudev imported",
        ["-c", "import petitkexec.cli, petitkexec.discovery, petitkexec.facts, pyudev"],
    ),
    ("`plan`, whole process", ["-m", "petitkexec", "plan"]),
)
FIRST_WRITE_PHASE = "`exec`: start → first write under /sys"

# Runs in the guest. Each phase's time is the probe's CLOCK_MONOTONIC around the child (fork,
# exec, the child's whole life), or up to the child's first write under /sys.
PROBE_SOURCE = r'''
import json, os, statistics, subprocess, sys, time

PHASES = json.loads(sys.argv[1])
REPEAT = int(sys.argv[2])
VERSIONS = json.loads(sys.argv[3])
PYTHON = "/usr/bin/python3.11"
# An audit hook (PEP 578) sees every open() with its flags; steps run in forked children,
# which inherit it: each process prints its own first write under /sys.
HOOK = """
import os, runpy, sys, time
written = False
def first_write(event, args):
    global written
    if written or event != "open" or not str(args[0]).startswith("/sys/"):
        return
    mode, flags = args[1], args[2]
    if (isinstance(mode, str) and any(c in mode for c in "wa+")) or (flags or 0) & 3:
        written = True
        os.write(2, ("FIRST-WRITE %d %s\\n" % (time.monotonic_ns(), args[0])).encode())
sys.addaudithook(first_write)
sys.argv[0] = "petitkexec"
runpy.run_module("petitkexec", run_name="__main__", alter_sys=True)
"""

def failed(version, name, done):
    print("ICOUNT-FAILED", version, name, done.returncode, done.stderr[-500:], flush=True)

def run(args, env):
    began = time.monotonic_ns()
    done = subprocess.run([PYTHON, *args], env=env, capture_output=True, text=True)
    return began, time.monotonic_ns(), done

for version, pythonpath in VERSIONS:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    for name, args in PHASES:
        run(args, env)  # writes the bytecode
        counts = []
        for _ in range(REPEAT):
            began, ended, done = run(args, env)
            if done.returncode != 0:
                failed(version, name, done)
                break
            counts.append(ended - began)
        if counts:
            print("ICOUNT", version, statistics.median(counts), name, flush=True)
    counts = []
    for attempt in range(REPEAT + 1):
        began, _, done = run(["-c", HOOK, "exec", "--kexec", "/bin/false"], env)
        lines = done.stderr.splitlines()
        writes = [line.split() for line in lines if line.startswith("FIRST-WRITE ")]
        if not writes:
            failed(version, "exec", done)
            break
        first = min(writes, key=lambda w: int(w[1]))
        print("ICOUNT-FIRST-WRITE", version, first[2], "exit", done.returncode, flush=True)
        if attempt:  # the first run wrote the bytecode
            counts.append(int(first[1]) - began)
    if counts:
        print("ICOUNT", version, statistics.median(counts), "FIRST-WRITE", flush=True)
'''

LINE = re.compile(r"^ICOUNT (\S+) (\d+(?:\.\d+)?) (.+)$", re.M)


def package_files(ref: str) -> dict[str, bytes]:
    """petitkexec/ as it was at `ref`, for the guest's /opt/before."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "petitkexec"],
        check=True,
        capture_output=True,
    ).stdout
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            extracted = tar.extractfile(member) if member.isfile() else None
            if extracted is not None:
                files[f"{BEFORE_DIR.lstrip('/')}/{member.name}"] = extracted.read()
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", help="a git ref: measure petitkexec as it was there too")
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    import json
    import shlex

    versions = [["this tree", ""]]
    files = {PROBE.lstrip("/"): PROBE_SOURCE.encode()}
    if options.before:
        versions.insert(0, [f"at {options.before}", BEFORE_DIR])
        files.update(package_files(options.before))
    phases = [[name, args] for name, args in PHASES]
    versions = [[label.replace(" ", "_"), path] for label, path in versions]
    command = " ".join(
        shlex.quote(a)
        for a in [
            "python3.11",
            PROBE,
            json.dumps(phases),
            str(options.repeat),
            json.dumps(versions),
        ]
    )
    run = boot_guest(
        command + "\n", extra_qemu_args=ICOUNT, extra_files=files, load_second=True, timeout=3600
    )
    found: dict[str, dict[str, float]] = {}
    for version, count, name in LINE.findall(run.log):
        found.setdefault(version, {})[FIRST_WRITE_PHASE if name == "FIRST-WRITE" else name] = float(
            count
        )
    failures = [line for line in run.log.splitlines() if line.startswith("ICOUNT-FAILED")]
    if failures or not found:
        raise SystemExit("\n".join(failures) or f"no counts:\n{run.tail()}")
    for line in run.log.splitlines():
        if line.startswith("ICOUNT-FIRST-WRITE"):
            print(line, file=sys.stderr)
    labels = list(found)
    names = [name for name, _ in PHASES] + [FIRST_WRITE_PHASE]
    print(
        "| phase (cumulative; M guest instructions, median of "
        f"{options.repeat}) | " + " | ".join(f"{v}: total / over bare" for v in labels) + " |"
    )
    print("| --- |" + " --- |" * len(labels))
    for name in names:
        cells = []
        for version in labels:
            counts = found[version]
            bare = counts.get(PHASES[0][0])
            count = counts.get(name)
            cells.append(
                "-"
                if count is None or bare is None
                else f"{count / 1e6:.1f} / {(count - bare) / 1e6:.1f}"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    if len(labels) == 2:
        before, after = (found[v] for v in labels)
        bare_b, bare_a = before[PHASES[0][0]], after[PHASES[0][0]]
        first_b, first_a = before.get(FIRST_WRITE_PHASE), after.get(FIRST_WRITE_PHASE)
        if first_b and first_a:
            ours, theirs = first_a - bare_a, first_b - bare_b
            print(
                f"\nstart → first write over bare: {ours / 1e6:.1f} M vs {theirs / 1e6:.1f} M "
                f"({ours / theirs:.2f} x)"
            )


if __name__ == "__main__":
    main()
