"""The Debian package built from the working tree (scripts/build-deb), for the guests and tests.

    deb = build_deb()   # .cache/vm/deb/<key>/petitkexec_<version>_all.deb

Cached by a hash of what goes into it (DEB_INPUTS): an edit of the code or of debian/ makes a
new one, an edit of a test does not. The build needs the packages in .ci/apt-packages
(debhelper, dh-python, pybuild-plugin-pyproject, python3-click ...); it takes ~15 s here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from .images.lanes import REPO_ROOT, cache_dir

BUILD_COMMAND = REPO_ROOT / "scripts" / "build-deb"
# The tree's files that shape the package: the Python package and its data, the packaging,
# the generators debian/rules runs, and what it ships as documentation or runs at build time.
DEB_INPUTS = (
    "pyproject.toml",
    "README.md",
    "COPYING",
    "petitkexec",
    "systemd",
    "debian",
    "scripts/build-deb",
    "scripts/generated_docs.py",
    "tests/fixtures/snapshot-q35.json",
)
# What debian/rules needs on the host, by command (the packages are in .ci/apt-packages).
HOST_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3")


class DebBuildError(RuntimeError):
    pass


def version() -> str:
    return subprocess.run(
        ["dpkg-parsechangelog", "-S", "Version"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _input_files() -> list[Path]:
    files = []
    for name in DEB_INPUTS:
        path = REPO_ROOT / name
        if path.is_file():
            files.append(path)
        else:
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            )
    return files


def key() -> str:
    digests = [
        (str(p.relative_to(REPO_ROOT)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in _input_files()
    ]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:12]


def missing_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def build_deb() -> Path:
    """The cached .deb for the tree as it is, built if missing."""
    root = cache_dir() / "deb"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = root / key()
        deb = out / f"petitkexec_{version()}_all.deb"
        if deb.is_file():
            return deb
        for old in root.iterdir():
            if old.is_dir():
                shutil.rmtree(old)
        done = subprocess.run(
            [str(BUILD_COMMAND), str(out)], cwd=REPO_ROOT, capture_output=True, text=True
        )
        if done.returncode != 0 or not deb.is_file():
            raise DebBuildError(f"scripts/build-deb failed:\n{done.stderr[-3000:]}")
        return deb
