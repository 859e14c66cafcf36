"""The Debian package (debian/, scripts/build-deb) and the README's Debian install lines (issue 18).

- the package: lintian reports neither errors nor warnings; it ships what `install-systemd`
  writes (the hook byte for byte, the units with /usr/bin/petitkexec, /etc/default/petitkexec
  as its only conffile), a man page for every command and click's completion scripts;
- the README's lines for Debian, as written, in a fresh Debian 12 root (the systemd guest's
  mmdebstrap base, tests/vm/systemd_guest.py, extracted; not booted): as an ordinary user with
  sudo, in a copy of the checkout. Then `apt remove` takes the hook away (and keeps the
  conffile), `apt purge` the conffile and /var/lib/petitkexec.

Marked `vm` with the QEMU lane: it needs what that lane needs on the host (.ci/apt-packages:
debhelper, mmdebstrap ...), root, and Debian's archive for the build dependencies in the root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from petitkexec.cli import cli
from petitkexec.install import files_to_install
from tests.vm import debian_package, systemd_guest
from tests.vm.conftest import in_ci
from tests.vm.images.lanes import REPO_ROOT, cache_dir

pytestmark = pytest.mark.vm

README = REPO_ROOT / "README.md"
LINES_MARKER = "<!-- debian-install-lines -->"
COMMAND = "/usr/bin/petitkexec"
USER = "admin"  # the ordinary user with sudo who runs the README's lines
CHECKOUT = f"/home/{USER}/petitkexec"
HOOK = "usr/lib/systemd/system-shutdown/petitkexec.shutdown"
DEFAULTS = "etc/default/petitkexec"
UNITS = ("petitkexec-snapshot.service", "petitkexec-verify.service")
WANTS = "etc/systemd/system/multi-user.target.wants"
STATE = "var/lib/petitkexec"
LINES_TIMEOUT = 1800  # apt-get update, ~60 build dependencies from the archive, the build


def _skip_or_fail(problem: str) -> None:
    if in_ci():
        pytest.fail(problem)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def deb(record_timing: Callable[[str, str], None]) -> Path:
    missing = debian_package.missing_tools()
    if missing:
        _skip_or_fail(f"building the package needs {', '.join(missing)}: see .ci/apt-packages")
    built = debian_package.build_deb()
    record_timing("Debian package", f"{built.name}: {built.stat().st_size} bytes")
    return built


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True, text=True).stdout


# --- the package -------------------------------------------------------------------------------


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    if shutil.which("lintian") is None:
        _skip_or_fail("lintian is not installed: see .ci/apt-packages")
    done = subprocess.run(["lintian", "--pedantic", str(deb)], capture_output=True, text=True)
    tags = [line for line in done.stdout.splitlines() if re.match(r"[EWP]: ", line)]
    assert tags == [], done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


def test_package_ships_what_install_systemd_writes(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    hook = tmp_path / HOOK
    assert hook.read_bytes() == (REPO_ROOT / "systemd/petitkexec.shutdown").read_bytes()
    assert hook.stat().st_mode & 0o777 == 0o755
    expected = {item.path.name: item.text for item in files_to_install(COMMAND)}
    for unit in UNITS:
        text = (tmp_path / "lib/systemd/system" / unit).read_text()
        assert text == expected[unit]
        assert f"={COMMAND} " in text
    assert (tmp_path / DEFAULTS).read_text() == expected["petitkexec"]
    assert f"PETITKEXEC={COMMAND}\n" in (tmp_path / DEFAULTS).read_text()
    assert (tmp_path / "usr/bin/petitkexec").stat().st_mode & 0o111
    conffiles = subprocess.run(
        f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert conffiles.split() == [f"/{DEFAULTS}"]
    depends = _dpkg_deb("-f", str(deb), "Depends")
    for library in ("python3-click", "python3-pyudev", "python3-structlog"):
        assert library in depends, depends


def test_package_has_a_man_page_per_command_and_completion(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    pages = {p.name for p in (tmp_path / "usr/share/man/man1").iterdir()}
    assert pages == {"petitkexec.1.gz", *(f"petitkexec-{name}.1.gz" for name in cli.commands)}
    bash = (tmp_path / "usr/share/bash-completion/completions/petitkexec").read_text()
    assert "_PETITKEXEC_COMPLETE=bash_complete" in bash and "complete " in bash
    zsh = (tmp_path / "usr/share/zsh/vendor-completions/_petitkexec").read_text()
    assert zsh.startswith("#compdef petitkexec")
    fish = (tmp_path / "usr/share/fish/vendor_completions.d/petitkexec.fish").read_text()
    assert "complete " in fish and "petitkexec" in fish


# --- the README's lines in a fresh Debian 12 root ----------------------------------------------


def readme_debian_lines() -> list[str]:
    """The commands of the README's Debian block (the ```sh block after LINES_MARKER)."""
    after = README.read_text().split(LINES_MARKER, 1)
    assert len(after) == 2, f"README.md has no {LINES_MARKER}"
    block = re.match(r"\s*```sh\n(.*?)```", after[1], re.S)
    assert block, "no ```sh block right after the marker"
    return [
        line
        for line in block.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _checkout_files() -> list[str]:
    """What a clone of this checkout holds (tracked files, and new ones not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [name for name in out.split("\0") if name and (REPO_ROOT / name).is_file()]


def _in_root(root: Path, script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh) chrooted into `root` as root, with /proc, /dev/pts and a read-only
    /sys (the host's: `petitkexec plan` only reads it) mounted in a private mount namespace
    that ends with it: nothing stays mounted on the host."""
    setup = (
        'set -e; mount -t proc proc "$1/proc"; mount -t sysfs -o ro sysfs "$1/sys"; '
        # apt and sudo want a pty for their logs: a devpts instance of its own
        'mount -t devpts -o newinstance,ptmxmode=0666 devpts "$1/dev/pts"; '
        'exec chroot "$1" /bin/sh -c "$2"'
    )
    env = {"PATH": systemd_guest.GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    namespace = ["unshare", "--mount", "--propagation", "private"]
    return subprocess.run(
        [*namespace, "sh", "-c", setup, "sh", str(root), script],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def bookworm_root(deb: Path) -> Iterator[Path]:
    """A fresh Debian 12 root with a copy of this checkout, under .cache/vm/debian-lines/ (not
    pytest's temporary directory, which other pytest runs on this machine may prune), removed
    afterwards; the log of the README's lines stays next to it."""
    missing = [t for t in ("mmdebstrap", "unshare", "chroot", "git") if shutil.which(t) is None]
    if missing:
        _skip_or_fail(f"the Debian 12 root needs {', '.join(missing)}: see .ci/apt-packages")
    if os.geteuid() != 0:
        _skip_or_fail("the Debian 12 root is made and entered as root (tar -p, chroot)")
    base = systemd_guest.base_tarball()
    work = cache_dir() / "debian-lines"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    root.mkdir(parents=True)
    subprocess.run(
        ["tar", "-C", str(root), "--numeric-owner", "--xattrs", "-xpf", str(base)], check=True
    )
    checkout = root / CHECKOUT.lstrip("/")
    for name in _checkout_files():
        target = checkout / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")  # apt reaches the archive
    # A fresh machine as a new user finds it: none of petitkexec's libraries (the guest's base
    # has them), package lists, sudo, and a user who may use it. apt answers its own question
    # (Assume-Yes): the lines below are run as written, without a terminal.
    setup = "\n".join(
        [
            "set -e",
            "export DEBIAN_FRONTEND=noninteractive",
            "apt-get purge -y -q python3-click python3-pyudev python3-structlog",
            "apt-get update -q",
            "apt-get install -y -q sudo",
            f"useradd -m -s /bin/sh {USER}",
            f"echo '{USER} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{USER}",
            "echo 'APT::Get::Assume-Yes \"true\";' > /etc/apt/apt.conf.d/90assume-yes",
            f"chown -R {USER}:{USER} {CHECKOUT}",
        ]
    )
    done = _in_root(root, setup, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def readme_run(
    bookworm_root: Path, record_timing: Callable[[str, str], None]
) -> subprocess.CompletedProcess[str]:
    lines = readme_debian_lines()
    script = f"set -ex\ncd {CHECKOUT}\n" + "\n".join(lines) + "\n"
    (bookworm_root / "home" / USER / "readme-lines.sh").write_text(script)
    started = time.monotonic()
    done = _in_root(
        bookworm_root,
        f"exec su -l {USER} -c 'sh /home/{USER}/readme-lines.sh'",
        timeout=LINES_TIMEOUT,
    )
    log = bookworm_root.parent / "readme-lines.log"
    log.write_text(done.stdout + done.stderr)
    record_timing(
        "README's Debian lines (bookworm root: build dependencies, build, install, 2 plans)",
        f"{time.monotonic() - started:.1f}s (log {log})",
    )
    return done


def test_readme_debian_lines_work_as_written_in_a_fresh_debian_12(
    bookworm_root: Path, readme_run: subprocess.CompletedProcess[str]
) -> None:
    done = readme_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = readme_debian_lines()
    assert any("build-deb" in line and "apt install ./dist/" in line for line in lines), lines
    # Both `petitkexec plan`s (the package's, the checkout's) planned this host's functions.
    summaries = re.findall(r"^\d+ functions: .*$", done.stdout, re.M)
    assert len(summaries) == 2 and summaries[0] == summaries[1], done.stdout[-3000:]
    root = bookworm_root
    assert (root / HOOK).is_file() and (root / DEFAULTS).is_file()
    assert f"PETITKEXEC={COMMAND}\n" in (root / DEFAULTS).read_text()
    for unit in UNITS:
        assert (root / "lib/systemd/system" / unit).is_file()
        assert os.readlink(root / WANTS / unit) == f"/lib/systemd/system/{unit}"


def _status(root: Path) -> str:
    done = _in_root(root, "dpkg-query -W -f '${Status}' petitkexec 2>&1 || true", timeout=60)
    return done.stdout.strip()


def test_remove_takes_the_hook_away_and_purge_the_conffile(
    bookworm_root: Path, readme_run: subprocess.CompletedProcess[str]
) -> None:
    assert readme_run.returncode == 0, readme_run.stderr[-2000:]
    root = bookworm_root
    # What petitkexec-snapshot.service leaves at a shutdown.
    (root / STATE).mkdir(parents=True, exist_ok=True)
    (root / STATE / "last-shutdown.json").write_text("{}\n")
    done = _in_root(root, "apt-get remove -y -q petitkexec", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _status(root) == "deinstall ok config-files"
    # systemd-shutdown runs what is in its directory: nothing of petitkexec's any more (dpkg
    # removes the directory too when the hook was all it held).
    hook_dir = (root / HOOK).parent
    hooks = sorted(p.name for p in hook_dir.iterdir()) if hook_dir.exists() else []
    assert not any("petitkexec" in name for name in hooks), hooks
    assert not (root / "usr/bin/petitkexec").exists()
    assert (root / DEFAULTS).is_file()  # the admin's, until purged
    done = _in_root(root, "apt-get purge -y -q petitkexec", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _status(root).startswith("dpkg-query: no packages found"), _status(root)
    assert not (root / DEFAULTS).exists()
    assert not (root / STATE).exists()
    assert not any((root / WANTS / unit).is_symlink() for unit in UNITS)
