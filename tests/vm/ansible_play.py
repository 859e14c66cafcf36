"""ansible-playbook from the host against the systemd guest, over SSH through QEMU's port
forward on 127.0.0.1 (tests/vm/test_ansible_guest.py).

ansible-core lives in its own venv under .cache/ (made on first use, pinned): not in the test
extra, so that none of its dependencies (jinja2, PyYAML, cryptography ...) is importable by
the project's tests, where it could hide an undeclared import of petitkexec's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .images.lanes import REPO_ROOT, cache_dir
from .images.run import log

ANSIBLE_CORE = "2.19.14"  # needs Python >= 3.11 on the controller, >= 3.8 on the target
ROLES = REPO_ROOT / "contrib/ansible/roles"
SITE = REPO_ROOT / "contrib/ansible/site.yml"


def ansible_venv() -> Path:
    """The venv's bin/ with ansible-playbook, made if missing (a venv names its python by
    absolute path, so it is made where it stays; `complete` is written last)."""
    venv = cache_dir().parent / f"ansible-{ANSIBLE_CORE}"
    if not (venv / "complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        # No pip of its own: the venv's ensurepip failed once in a CI run, with nothing said;
        # this interpreter's pip installs into it instead (pip's --python).
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python")]
        subprocess.run([*pip, "install", "-q", f"ansible-core=={ANSIBLE_CORE}"], check=True)
        (venv / "complete").write_text(ANSIBLE_CORE + "\n")
        log(f"ansible-core {ANSIBLE_CORE} in {venv} ({time.monotonic() - started:.0f}s)")
    return venv / "bin"


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (QEMU binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def throwaway_key(directory: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair for this run: (private key file, public key line)."""
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pktest", "-f", str(key)],
        check=True,
    )
    return key, (directory / "id_ed25519.pub").read_text().strip()


@dataclasses.dataclass(frozen=True)
class PlayResult:
    returncode: int
    output: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Controller:
    """One guest as an inventory of one host, reached on 127.0.0.1:port as root."""

    bin: Path
    port: int
    key: Path
    work: Path

    @property
    def ssh_options(self) -> list[str]:
        # The guest's host keys are new with every image: nothing to check them against.
        return [
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10",
            "-i", str(self.key),
            "-p", str(self.port),
        ]  # fmt: skip

    def inventory(self) -> Path:
        path = self.work / "inventory.ini"
        path.write_text(
            "[kexec]\n"
            f"pkguest ansible_host=127.0.0.1 ansible_port={self.port} ansible_user=root "
            f"ansible_ssh_private_key_file={self.key} "
            "ansible_python_interpreter=/usr/bin/python3 "
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'\n"
        )
        return path

    def play(self, *extra_vars: str, timeout: float = 1500) -> PlayResult:
        env = {
            **os.environ,
            "ANSIBLE_ROLES_PATH": str(ROLES),
            "ANSIBLE_HOME": str(self.work / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            # One SSH round trip per task, not three (each costs seconds of a TCG guest).
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.work / "cp"),
        }
        args = [str(self.bin / "ansible-playbook"), "-i", str(self.inventory()), str(SITE)]
        for var in extra_vars:
            args += ["-e", var]
        started = time.monotonic()
        done = subprocess.run(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        return PlayResult(done.returncode, done.stdout, time.monotonic() - started)

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *self.ssh_options, "root@127.0.0.1", command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
