"""The single-file build: scripts/build-zipapp's petitkexec.pyz runs with nothing but Python.

Built here into a temporary directory (the pinned wheels come from PyPI; without PyPI these
tests are skipped, except in CI). Every archive is run as the target runs it: `-I -S` (-I
alone keeps site-packages: it only drops the user site and the PYTHON* variables; in this
venv that would put click, structlog and the editable petitkexec, whose finder comes before
the archive, within reach), no PYTHONPATH, from a directory outside the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.ci import in_ci

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport is a runtime dependency on 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
BUILD_COMMAND = REPO / "scripts" / "build-zipapp"
SNAPSHOT = REPO / "tests" / "fixtures" / "snapshot-q35.json"
PYTHON_VERSION = "{}.{}".format(*sys.version_info[:2])
PROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
    "version"
]
SIZE_GOAL = 400 * 1024
VARIANTS = {
    "full": [],  # sources and bytecode (the default)
    "bytecode-only": ["--no-sources"],
    "sources-only": ["--no-bytecode"],
}
PACKAGES = ("petitkexec", "petitkexec.systemd", "click", "structlog", "pyudev")

# Runs an archive as `python -I -S petitkexec.pyz ARGS` would, watching through an audit hook
# for modules compiled from source out of the archive and for files opened for writing next to
# it. Writes what it saw to REPORT (elsewhere).
PROBE = r"""
import json, os, runpy, sys
archive, report, *argv = sys.argv[1:]
watched = os.path.dirname(archive) + os.sep
seen = {"compiled": [], "written": []}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def hook(event, args):
    if event == "compile" and isinstance(args[1], str) and args[1].startswith(archive):
        seen["compiled"].append(args[1])
    elif event == "open" and isinstance(args[0], (str, bytes)):
        path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2] or 0
        if (any(c in mode for c in "wax+") or flags & WRITING) and path.startswith(watched):
            seen["written"].append(path)

sys.addaudithook(hook)
sys.argv = [archive, *argv]
try:
    runpy.run_path(archive, run_name="__main__")
    seen["exit"] = 0
except SystemExit as exit:
    seen["exit"] = exit.code
with open(report, "w") as out:
    json.dump(seen, out)
"""


def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/click/", timeout=20) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("elsewhere")
    assert not directory.resolve().is_relative_to(REPO)
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zipapp")
    archives = {}
    for name, options in VARIANTS.items():
        archive = root / name / "petitkexec.pyz"
        done = subprocess.run(
            [
                str(BUILD_COMMAND),
                "--python-version",
                PYTHON_VERSION,
                "--python",
                sys.executable,
                "--wheels",
                str(root / "wheels"),  # downloaded once for the three builds
                "-o",
                str(archive),
                *options,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHON": sys.executable},
        )
        if done.returncode != 0:
            if not in_ci() and not pypi_reachable():
                pytest.skip("PyPI cannot be reached: the build downloads the pinned wheels")
            pytest.fail(f"build-zipapp {' '.join(options)} failed:\n{done.stdout}{done.stderr}")
        archives[name] = archive
    return archives


def run_archive(archive: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", str(archive), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_environment(),
        timeout=300,
    )


def probe(archive: Path, report: Path, *args: str, cwd: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE, str(archive), str(report), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=clean_environment(),
        timeout=300,
    )
    assert report.exists(), done.stderr
    result: dict[str, object] = json.loads(report.read_text())
    return result


def names(archive: Path) -> set[str]:
    with zipfile.ZipFile(archive) as opened:
        return {name for name in opened.namelist() if not name.endswith("/")}


@pytest.mark.parametrize("variant", ["full", "bytecode-only"])
def test_version(built: dict[str, Path], outside: Path, variant: str) -> None:
    done = run_archive(built[variant], "--version", cwd=outside)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"petitkexec.pyz, version {PROJECT_VERSION}\n"


@pytest.mark.parametrize("variant", ["full", "bytecode-only"])
def test_plan_json_equals_the_installed_cli(
    built: dict[str, Path], outside: Path, variant: str
) -> None:
    args = ("plan", "--snapshot", str(SNAPSHOT), "--json")
    installed = subprocess.run(
        [sys.executable, "-m", "petitkexec", *args],
        capture_output=True,
        text=True,
        cwd=outside,
        check=True,
    )
    done = run_archive(built[variant], *args, cwd=outside)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(installed.stdout)
    assert json.loads(done.stdout)["steps"]


def test_help(built: dict[str, Path], outside: Path) -> None:
    done = run_archive(built["bytecode-only"], "--help", cwd=outside)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: petitkexec.pyz [OPTIONS] COMMAND [ARGS]...")
    commands = done.stdout.split("Commands:", 1)[1].split()
    assert {"plan", "snapshot", "teardown", "exec"} <= set(commands)
    assert "Exit codes:" in done.stdout


def test_everything_is_imported_from_the_archive(built: dict[str, Path], outside: Path) -> None:
    archive = built["bytecode-only"]
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(archive)!r})\n"
        f"files = {{n: importlib.import_module(n).__file__ for n in {PACKAGES!r}}}\n"
        "from petitkexec.install import files_to_install\n"  # reads petitkexec.systemd's data
        "installed = [str(f.path) for f in files_to_install('petitkexec')]\n"
        "print(json.dumps([files, installed]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=outside,
        env=clean_environment(),
    )
    assert done.returncode == 0, done.stderr
    files, installed = json.loads(done.stdout)
    for package, file in files.items():
        assert file.startswith(f"{archive}/"), (package, file)
        assert file.endswith("__init__.pyc"), (package, file)
    assert "usr/lib/systemd/system-shutdown/petitkexec.shutdown" in installed


def test_every_module_carries_bytecode_for_this_python(built: dict[str, Path]) -> None:
    full, bytecode_only = names(built["full"]), names(built["bytecode-only"])
    sources = {n for n in full if n.endswith(".py")}
    assert {n for n in full if n.endswith(".pyc")} == {n + "c" for n in sources}
    assert "petitkexec/cli.pyc" in full and "petitkexec/systemd/__init__.pyc" in full
    assert "click/core.pyc" in full and "structlog/__init__.pyc" in full
    # Bytecode only: the same modules, and one source left, __main__.py, which names the
    # Python to rebuild for when this one cannot read the bytecode.
    assert {n for n in bytecode_only if n.endswith(".py")} == {"__main__.py"}
    assert {n for n in bytecode_only if n.endswith(".pyc")} == {n + "c" for n in sources}
    assert not [n for n in full if "__pycache__" in n or n.endswith((".pyi", "py.typed"))]
    with zipfile.ZipFile(built["full"]) as archive:
        for name in sources:
            pyc = archive.read(name + "c")
            # PEP 552: magic, flags 0b01 (hash-based, unchecked), the source's hash.
            assert pyc[:4] == importlib.util.MAGIC_NUMBER, name
            assert int.from_bytes(pyc[4:8], "little") == 0b01, name
            assert pyc[8:16] == importlib.util.source_hash(archive.read(name)), name
    # The same bytecode with or without the sources (__main__ differs: it knows which).
    with zipfile.ZipFile(built["full"]) as one, zipfile.ZipFile(built["bytecode-only"]) as other:
        for name in sources - {"__main__.py"}:
            assert one.read(name + "c") == other.read(name + "c"), name


def test_version_metadata_and_licenses_are_shipped(built: dict[str, Path]) -> None:
    shipped = names(built["bytecode-only"])
    assert f"petitkexec-{PROJECT_VERSION}.dist-info/METADATA" in shipped
    assert f"petitkexec-{PROJECT_VERSION}.dist-info/licenses/COPYING" in shipped
    for package in ("click", "structlog", "pyudev"):
        dist_info = {n for n in shipped if n.startswith(f"{package}-")}
        assert any(n.endswith("/METADATA") for n in dist_info), package
        assert any("/licenses/" in n for n in dist_info), package
        assert not any(n.endswith(("/RECORD", "/WHEEL", "/INSTALLER")) for n in dist_info)


@pytest.mark.parametrize("variant", ["full", "bytecode-only"])
def test_bytecode_is_used_and_nothing_is_written(
    built: dict[str, Path], outside: Path, tmp_path: Path, variant: str
) -> None:
    """Run from a read-only copy. As root the permissions stop nothing, so an audit hook
    watches: no module compiled from source, no file opened for writing next to the archive,
    and the directory unchanged afterwards."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    archive = read_only / "petitkexec.pyz"
    shutil.copyfile(built[variant], archive)
    archive.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    read_only.chmod(0o555)
    try:
        before = sorted(read_only.rglob("*"))
        seen = probe(
            archive, tmp_path / "seen.json", "plan", "--snapshot", str(SNAPSHOT), cwd=outside
        )
        assert seen == {"compiled": [], "written": [], "exit": 0}
        done = run_archive(archive, "plan", "--snapshot", str(SNAPSHOT), cwd=read_only)
        assert done.returncode == 0, done.stderr
        assert sorted(read_only.rglob("*")) == before
    finally:
        read_only.chmod(0o755)


def test_the_probe_sees_compiling(built: dict[str, Path], outside: Path, tmp_path: Path) -> None:
    """Without bytecode every module is compiled at every start: what the test above rules out."""
    archive = built["sources-only"]
    seen = probe(archive, tmp_path / "seen.json", "plan", "--snapshot", str(SNAPSHOT), cwd=outside)
    compiled = seen["compiled"]
    assert isinstance(compiled, list)
    assert f"{archive}/petitkexec/cli.py" in compiled and f"{archive}/click/core.py" in compiled


def test_a_wrong_python_is_told_to_rebuild(built: dict[str, Path], outside: Path) -> None:
    code = (
        "import runpy, sys\n"
        "sys.version_info = (3, 99, 0, 'final', 0)\n"
        f"sys.argv = [{str(built['bytecode-only'])!r}, '--version']\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, cwd=outside
    )
    assert done.returncode == 1
    assert (
        f"built for Python {PYTHON_VERSION} (bytecode only); this is 3.99. Rebuild it with "
        "scripts/build-zipapp --python-version 3.99"
    ) in done.stderr


def test_size(built: dict[str, Path]) -> None:
    sizes = {name: archive.stat().st_size for name, archive in built.items()}
    assert sizes["bytecode-only"] <= SIZE_GOAL, sizes
