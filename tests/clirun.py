"""Running the command line in-process against a simulated kernel, and kexec stand-ins."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner, Result

from petitkexec.cli import cli
from petitkexec.environment import Environment
from tests.simkernel import SimKernel

ROOT_MOUNT = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"


def environment(sim: SimKernel, tmp_path: Path, euid: int = 0) -> Environment:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "mountinfo").write_text(ROOT_MOUNT)
    return Environment(
        sysfs_root=sim.root, proc_root=proc, discover=sim.topology, writer=sim, euid=euid
    )


def runner() -> CliRunner:
    """A CliRunner whose result has stdout and stderr apart: click 8.2 always keeps them apart
    (and has no `mix_stderr`); 8.1 (Debian 12's python3-click is 8.1.3) only when asked."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(env: Environment, *args: str) -> Result:
    return runner().invoke(cli, list(args), obj=env, catch_exceptions=False)


def shell_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def fake_kexec(tmp_path: Path, sim: SimKernel, returncode: int = 1) -> Path:
    """A kexec stand-in that records what it saw at the moment of the handoff, then fails."""
    return shell_script(
        tmp_path / "kexec",
        f'echo "$@" > {tmp_path}/kexec-args\n'
        f"find {sim.root}/bus/pci/drivers -mindepth 2 -type l | wc -l"
        f" > {tmp_path}/bound-at-handoff\n"
        f"exit {returncode}\n",
    )
