"""petitkexec's initramfs layers: its dependencies, and petitkexec itself from the working tree.

They are separate from the stage-1 base because they change at different paces: the
dependencies when pyproject.toml does (cached in build-<key>/ by their list), petitkexec at
every test session (the tree changes under test). Both are installed with pip for the guest's
Python 3.11 and appended to the base as cpio layers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cpio import write_cpio
from .lanes import REPO_ROOT
from .python import GUEST_SITE_PACKAGES, compile_tree
from .run import ImageError, log, run

FALLBACK_DEPENDENCIES = ("click>=8.1", "pyudev>=0.24", "structlog>=22.1")
FALLBACK_ENTRY_POINT = "petitkexec.cli:main"
WRAPPER = """#!/bin/sh
# petitkexec, installed from the working tree by tests/vm/images/layers.py ({how}).
exec /usr/bin/python3.11 -c 'import sys; sys.argv[0] = "petitkexec"
try:
    from {module} import {func} as main
except ImportError as error:
    print("petitkexec is not installed in this guest image:", error, file=sys.stderr)
    sys.exit(127)
sys.exit(main())' "$@"
"""
# What pip's build of the working tree does not need (it works on a copy: see below).
NOT_COPIED = (
    ".git",
    ".cache",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "tests",
    "bench",
)


def _pyproject() -> dict[str, Any]:
    path = REPO_ROOT / "pyproject.toml"
    if not path.exists():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return {}
    data: dict[str, Any] = tomllib.loads(path.read_text())
    return data


def project_dependencies() -> list[str]:
    return list(_pyproject().get("project", {}).get("dependencies", FALLBACK_DEPENDENCIES))


def project_entry_point() -> str:
    scripts = _pyproject().get("project", {}).get("scripts", {})
    return str(scripts.get("petitkexec", FALLBACK_ENTRY_POINT))


def _pip() -> list[str]:
    for python in (sys.executable, "/usr/bin/python3"):
        if not Path(python).exists():
            continue
        if run([python, "-m", "pip", "--version"], check=False).returncode == 0:
            return [python, "-m", "pip"]
    raise ImageError("no pip on this host: apt-get install python3-pip (see .ci/apt-packages)")


def _pip_install(target: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return run(
        [
            *_pip(),
            "install",
            "--target",
            str(target),
            "--no-compile",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            *args,
        ],
        check=False,
    )


def build_deps_layer(out: Path) -> Path:
    """click, pyudev, structlog (as pyproject.toml lists them) for the guest's Python 3.11."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp)
        site = root / GUEST_SITE_PACKAGES
        proc = _pip_install(
            site,
            [
                "--python-version",
                "3.11",
                "--only-binary=:all:",
                "--implementation",
                "py",
                *project_dependencies(),
            ],
        )
        if proc.returncode != 0:
            raise ImageError(f"pip could not install the dependencies:\n{proc.stderr}")
        shutil.rmtree(site / "bin", ignore_errors=True)
        compile_tree(root, GUEST_SITE_PACKAGES)
        return write_cpio(root, out)


def build_project_layer(out: Path) -> tuple[Path, str]:
    """petitkexec from the working tree, with `pip install --no-deps --target`.

    Returns the layer and how it was installed: "pip", "copied" (pip failed but the package
    directory exists: copied as is), or "missing" (only the wrapper, which exits 127).
    """
    module, _, func = project_entry_point().partition(":")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp) / "root"
        site = root / GUEST_SITE_PACKAGES
        how = "missing"
        source = REPO_ROOT / "petitkexec"
        if (REPO_ROOT / "pyproject.toml").exists() and (source / "__init__.py").exists():
            # Build from a copy: pip's in-tree build would write build/ and *.egg-info into the
            # working tree that someone else is editing.
            work = Path(tmp) / "src"
            shutil.copytree(REPO_ROOT, work, ignore=shutil.ignore_patterns(*NOT_COPIED))
            proc = _pip_install(site, ["--no-deps", "--no-build-isolation", str(work)])
            if proc.returncode != 0:
                proc = _pip_install(site, ["--no-deps", str(work)])
            if proc.returncode == 0:
                how = "pip"
            else:
                log(
                    "pip install of the working tree failed; copying petitkexec/ as is:\n"
                    + proc.stderr.strip()[-2000:]
                )
                shutil.rmtree(site, ignore_errors=True)
                shutil.copytree(
                    source, site / "petitkexec", ignore=shutil.ignore_patterns("__pycache__")
                )
                how = "copied"
        else:
            log("no petitkexec package in the working tree yet: the guest gets only a wrapper")
        site.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(site / "bin", ignore_errors=True)
        if how != "missing":
            compile_tree(root, GUEST_SITE_PACKAGES)
        wrapper = root / "usr/bin/petitkexec"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(WRAPPER.format(how=how, module=module, func=func))
        wrapper.chmod(0o755)
        return write_cpio(root, out, level=1), how
