"""Build petitkexec.pyz: petitkexec and its pure-Python dependencies in one file.

    scripts/build-zipapp [--python-version X.Y] [--no-sources] [-o OUT]

Run as `python3 petitkexec.pyz plan`, with no pip and no site-packages on the target.

Why the stdlib's zipapp and not shiv or pex: both unpack the archive into a cache directory
(~/.shiv, ~/.pex) on first start and run from there, and pex resolves through pip-like
machinery; a petitboot image has neither a writable cache directory nor pip. A stdlib zipapp
is imported in place by zipimport, so the one file on flash is all there is.

zipimport never writes bytecode: without .pyc in the archive every start compiles every module
it imports (about 11 s instead of 3.5 s to the first unbind in the q35 TCG guest). So every
module is compiled here, by the target's own interpreter (the magic number changes with X.Y),
into the layout zipimport reads. zipimport does not look in __pycache__: for `a.b` it tries
`a/b/__init__.pyc`, `a/b/__init__.py`, `a/b.pyc`, `a/b.py` in that order (`_zip_searchorder`
in Lib/zipimport.py), so `b.pyc` lies next to `b.py` (the legacy layout of `compileall -b`).
The .pyc are "unchecked-hash" (PEP 552): zipimport compares a timestamp .pyc against the .py
entry's DOS time, which has 2-second resolution and is local time (a build in another time
zone would look stale and be recompiled at every start); an unchecked-hash .pyc is used as it
is, and source and bytecode are built together here, so they cannot drift apart.

With the sources (the default) a Python other than X.Y still runs the archive, compiling from
the sources at every start; with --no-sources it runs only on X.Y (the generated __main__.py
stays a source file so that it can say so).

Dependencies: the exact versions pinned in PINS (checked against pyproject.toml's requirements
at every build), pure `py3-none-any` wheels only, verified by their sha256 on PyPI, installed
with `pip install --target --no-deps` (their own dependencies are listed here explicitly).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipapp
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON_VERSION = "3.11"  # Debian 12's python3, as in the q35 guest; op-build has 3.11+
DEFAULT_OUTPUT = REPO / "dist" / "petitkexec.pyz"
SIZE_GOAL = 400 * 1024
# Every file gets this time (2000-01-01 UTC; zip's DOS time cannot go before 1980), and the
# archive is written in UTC, so the same inputs give the same bytes.
FIXED_MTIME = 946684800


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    sha256: str  # of the py3-none-any wheel, from https://pypi.org/simple/<name>/
    marker: str = ""  # the wheel is only needed where this holds (PEP 508)
    why: str = ""

    @property
    def wheel(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


PINS = (
    Pin("click", "8.5.1", "8bb5376d2006950386f8c6427613334a2acadc5f559cb80e638d00b4df957e37"),
    Pin("pyudev", "0.24.5", "a9c62d04a83472fb05ad5e014ef85933e5cf2fef193caf8b77bb7a9e8ded4812"),
    Pin("structlog", "26.1.0", "e081a26d6c373e6d201eca24eede26d8ffab07f88f477822e679183428d3d91e"),
    Pin(
        "tomli",
        "2.5.0",
        "32a7b79ac57a2e83670ce329ccf675798bc5a2094783a63676866b70503f2e2b",
        marker="python_version < '3.11'",
    ),
    Pin(
        "typing-extensions",
        "4.16.0",
        "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
        marker="python_version < '3.11'",
        why="structlog imports typing_extensions.Self below 3.11",
    ),
)

# What the image never needs: typing stubs and markers, and modules that can only work with
# packages that are not in the archive or on another OS. (structlog.testing stays: structlog's
# __init__ imports it.)
STRIP_NAMES = ("py.typed", "*.pyi", "__pycache__")
STRIP_MODULES = (
    "click/_winconsole.py",  # Windows consoles only
    "click/testing.py",  # CliRunner, a test helper; click itself never imports it
    "structlog/twisted.py",  # needs Twisted; structlog's import of it is guarded
    "structlog/_greenlets.py",  # needs greenlet; its import is guarded
    "pyudev/glib.py",  # GUI event-loop integrations: GLib, Qt, wx
    "pyudev/_qt_base.py",
    "pyudev/pyqt5.py",
    "pyudev/pyside.py",
    "pyudev/pyside6.py",
    "pyudev/wx.py",
)
# Of a dependency's dist-info only the METADATA headers (what importlib.metadata.version()
# reads: click's and structlog's __version__) and the license texts (BSD-3, MIT and Apache-2.0,
# LGPL-2.1 ask for them in every copy) are kept; RECORD, WHEEL, INSTALLER and the long
# description are not needed.
KEEP_IN_DIST_INFO = ("METADATA", "licenses/*", "LICENSE*", "COPYING*", "NOTICE*", "AUTHORS*")

# Bytecode size. Two things that a bootloader image does not need are left out of the .pyc
# (the .py, when shipped, are the originals):
# - the column tables of Python 3.11+ (`-X no_debug_ranges`): tracebacks keep their line
#   numbers and lose the ^^^ under the failing expression; about a fifth of the bytecode;
# - the docstrings of the dependencies (not petitkexec's: click makes the commands' help from
#   them). click, structlog and pyudev never read their own __doc__ (click reads the docstrings
#   of the commands it is given). Asserts stay (no -O).
STRIP_DOCSTRINGS = ("click/", "pyudev/", "structlog/", "tomli/", "typing_extensions.py")
# Run by the target's interpreter: what `py_compile` does with PycInvalidationMode.
# UNCHECKED_HASH (the PEP 552 header: magic, flags 0b01, the source's hash; all little-endian),
# compiled from the AST so that docstrings can be dropped. Code objects name their file
# `petitkexec.pyz/petitkexec/cli.py`, as zipimport would if it compiled the source.
COMPILER = """
import ast, importlib.util, marshal, sys
from pathlib import Path

stage, archive, *strip = sys.argv[1:]
DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

def drop_docstrings(tree):
    for node in ast.walk(tree):
        body = node.body if isinstance(node, DEFINITIONS) else None
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and (
            isinstance(first.value.value, str)
        ):
            docstring = body.pop(0)
            if not body:
                body.append(ast.copy_location(ast.Pass(), docstring))
    return tree

for path in sorted(Path(stage).rglob("*.py")):
    name = path.relative_to(stage).as_posix()
    source = path.read_bytes()
    tree = ast.parse(source, name)
    if name.startswith(tuple(strip)):
        tree = drop_docstrings(tree)
    code = compile(tree, archive + "/" + name, "exec", dont_inherit=True)
    header = importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little")
    header += importlib.util.source_hash(source)
    path.with_suffix(".pyc").write_bytes(header + marshal.dumps(code))
"""

MAIN_TEMPLATE = '''\
"""petitkexec.pyz: generated by scripts/build-zipapp."""

import sys

BUILT_FOR = {built_for!r}  # the Python it was built for: its bytecode, its dependencies
HAS_SOURCES = {has_sources!r}

if sys.version_info[:2] < BUILT_FOR or (not HAS_SOURCES and sys.version_info[:2] != BUILT_FOR):
    sys.exit(
        "petitkexec.pyz: built for Python %d.%d%s; this is %d.%d. Rebuild it with "
        "scripts/build-zipapp --python-version %d.%d"
        % (BUILT_FOR + ("" if HAS_SOURCES else " (bytecode only)",)
           + sys.version_info[:2] + sys.version_info[:2])
    )

from petitkexec.cli import main  # noqa: E402

main()
'''


class BuildError(Exception):
    pass


def load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 on the build host
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _packaging() -> tuple[Any, Any]:
    """`packaging` for markers and requirements: installed, or the copy inside pip (which the
    build needs anyway)."""
    try:
        from packaging import markers, requirements
    except ModuleNotFoundError:
        from pip._vendor.packaging import markers, requirements
    return markers, requirements


def marker_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
    }


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_for(python_version: str, pyproject: dict[str, Any]) -> list[Pin]:
    """The pins the target needs, after checking them against pyproject's dependencies: each
    dependency pinned, each pin allowed by it, and the markers the same."""
    markers, requirements = _packaging()
    environment = marker_environment(python_version)
    pins = {normalize(pin.name): pin for pin in PINS}
    for line in pyproject["project"]["dependencies"]:
        requirement = requirements.Requirement(line)
        pin = pins.get(normalize(requirement.name))
        if pin is None:
            raise BuildError(f"pyproject.toml requires {line!r}; pin it in {__file__}")
        if not requirement.specifier.contains(pin.version, prereleases=True):
            raise BuildError(f"{pin.name}=={pin.version} is not allowed by {line!r}")
        if str(requirement.marker or "") != str(markers.Marker(pin.marker) if pin.marker else ""):
            raise BuildError(f"{pin.name}: marker {pin.marker!r} differs from {line!r}")
    direct = {
        normalize(requirements.Requirement(d).name) for d in pyproject["project"]["dependencies"]
    }
    for name, pin in pins.items():
        if name not in direct and not pin.why:
            raise BuildError(f"{pin.name} is pinned but pyproject.toml does not require it")
    return [p for p in PINS if not p.marker or markers.Marker(p.marker).evaluate(environment)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )


def fetch_wheels(pins: list[Pin], python_version: str, wheels: Path) -> None:
    """Download the pinned wheels into `wheels`, unless they are there with the right hash."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [
        p for p in pins if not (wheels / p.wheel).is_file() or sha256(wheels / p.wheel) != p.sha256
    ]
    if not missing:
        return
    requirements = wheels / "requirements.txt"
    requirements.write_text(
        "".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in missing)
    )
    run([
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
        "--only-binary=:all:", "--platform", "any", "--implementation", "py", "--abi", "none",
        "--python-version", python_version, "--require-hashes", "-r", str(requirements),
        "-d", str(wheels),
    ])  # fmt: skip
    for pin in missing:
        if not (wheels / pin.wheel).is_file() or sha256(wheels / pin.wheel) != pin.sha256:
            raise BuildError(f"pip did not fetch {pin.wheel} with sha256 {pin.sha256}")


def install_wheels(pins: list[Pin], python_version: str, wheels: Path, target: Path) -> None:
    requirements = target.parent / "wheels.txt"
    requirements.write_text("".join(f"{wheels / p.wheel} --hash=sha256:{p.sha256}\n" for p in pins))
    run([
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
        "--no-index", "--only-binary=:all:", "--platform", "any", "--implementation", "py",
        "--abi", "none", "--python-version", python_version, "--no-compile",
        "--require-hashes", "--target", str(target), "-r", str(requirements),
    ])  # fmt: skip


def strip_dependencies(site: Path) -> None:
    for pattern in STRIP_NAMES:
        for path in sorted(site.rglob(pattern), reverse=True):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for module in STRIP_MODULES:
        (site / module).unlink(missing_ok=True)
    bin_dir = site / "bin"
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    for dist_info in site.glob("*.dist-info"):
        keep = {p for pattern in KEEP_IN_DIST_INFO for p in dist_info.glob(pattern) if p.is_file()}
        for path in sorted(dist_info.rglob("*"), reverse=True):
            if path.is_file() and path not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        metadata = dist_info / "METADATA"
        # The headers end at the first empty line; the description follows.
        metadata.write_text(metadata.read_text(encoding="utf-8").split("\n\n", 1)[0] + "\n")


def copy_petitkexec(pyproject: dict[str, Any], stage: Path) -> None:
    """The packages exactly as pyproject's [tool.setuptools] lays them out (systemd/ becomes
    petitkexec.systemd), with their package-data."""
    setuptools = pyproject["tool"]["setuptools"]
    package_dir = setuptools.get("package-dir", {})
    package_data = setuptools.get("package-data", {})
    for package in setuptools["packages"]:
        source = REPO / package_dir.get(package, package.replace(".", "/"))
        destination = stage / package.replace(".", "/")
        destination.mkdir(parents=True, exist_ok=True)
        files = set(source.glob("*.py"))
        for pattern in package_data.get(package, []) + package_data.get("*", []):
            files.update(p for p in source.glob(pattern) if p.is_file())
        if not (source / "__init__.py").is_file():
            raise BuildError(f"{source} is not a package")
        for path in sorted(files):
            shutil.copyfile(path, destination / path.name)


def write_dist_info(pyproject: dict[str, Any], stage: Path) -> None:
    """A minimal dist-info, so that `--version` (click.version_option(package_name=
    "petitkexec") calls importlib.metadata.version) works from the archive."""
    project = pyproject["project"]
    dist_info = stage / f"petitkexec-{project['version']}.dist-info"
    (dist_info / "licenses").mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {project['name']}\n"
        f"Version: {project['version']}\n"
        f"Summary: {project['description']}\n"
        f"License: {project['license']['text']}\n"
        f"Requires-Python: {project['requires-python']}\n"
    )
    shutil.copyfile(REPO / "COPYING", dist_info / "licenses" / "COPYING")


def interpreter_version(python: str) -> str | None:
    try:
        done = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_python(version: str) -> str:
    """An interpreter of `version` on this host: this one, pythonX.Y on PATH, /usr/bin,
    /usr/local/bin, or a pyenv version."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [
        sys.executable,
        shutil.which(f"python{version}"),
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"), reverse=True),
    ]
    for candidate in candidates:
        if (
            candidate
            and os.access(candidate, os.X_OK)
            and interpreter_version(candidate) == version
        ):
            return candidate
    tried = ", ".join(c for c in candidates if c)
    raise BuildError(
        f"no Python {version} to compile the bytecode with (tried {tried}); "
        "pass --python PATH, or --no-bytecode"
    )


def compile_bytecode(python: str, stage: Path, archive_name: str) -> None:
    """`name.pyc` next to every `name.py`, compiled by the target's interpreter."""
    # Not -I: it would ignore PYTHONHASHSEED, and the order of frozenset constants (`x in
    # {"a", "b"}`) in the bytecode follows the string hashes. -E is not needed: the
    # environment is made here.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    environment["PYTHONHASHSEED"] = "0"
    done = subprocess.run(
        [python, "-s", "-S", "-X", "no_debug_ranges", "-c", COMPILER, str(stage), archive_name,
         *STRIP_DOCSTRINGS],
        capture_output=True, text=True, env=environment, cwd=stage.parent,
    )  # fmt: skip
    if done.returncode != 0:
        raise BuildError(f"compiling with {python} failed:\n{done.stdout}{done.stderr}")
    missing = [p for p in stage.rglob("*.py") if not p.with_suffix(".pyc").is_file()]
    if missing:
        raise BuildError(f"not compiled: {', '.join(map(str, missing))}")


def normalize_tree(stage: Path) -> None:
    for path in [stage, *stage.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.utime(path, (FIXED_MTIME, FIXED_MTIME))


@dataclass(frozen=True)
class Report:
    output: Path
    size: int
    python_version: str
    python: str | None
    sources: bool
    bytecode: bool
    pins: tuple[Pin, ...]
    by_part: dict[str, int]  # top-level name -> bytes in the archive (compressed + headers)
    by_kind: dict[str, int]  # .py / .pyc / other -> bytes in the archive
    entries: int

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{kind} {size / 1024:.1f} KiB" for kind, size in self.by_kind.items())
        parts = ", ".join(f"{part} {size / 1024:.1f}" for part, size in self.by_part.items())
        content = (
            "sources + bytecode" if self.sources and self.bytecode
            else "bytecode only" if self.bytecode
            else "sources only"
        )  # fmt: skip
        goal = "within" if self.size <= SIZE_GOAL else "OVER"
        return [
            f"{self.output}: {self.size} bytes ({self.size / 1024:.1f} KiB, {goal} the "
            f"{SIZE_GOAL // 1024} KiB goal), {self.entries} entries, {content}",
            f"  Python {self.python_version}"
            + (f" bytecode compiled with {self.python}" if self.python else ""),
            "  dependencies: " + ", ".join(f"{p.name} {p.version}" for p in self.pins),
            f"  by kind: {kinds}",
            f"  by part (KiB): {parts}",
        ]


def entry_bytes(info: zipfile.ZipInfo) -> int:
    """What one entry costs in the archive: its data, local header and central record."""
    name = len(info.filename.encode())
    return info.compress_size + 30 + name + len(info.extra) + 46 + name + len(info.comment)


def describe(output: Path) -> tuple[dict[str, int], dict[str, int], int]:
    by_part: dict[str, int] = {}
    by_kind: dict[str, int] = {".py": 0, ".pyc": 0, "other": 0}
    with zipfile.ZipFile(output) as archive:
        infos = archive.infolist()
    for info in infos:
        part = info.filename.split("/", 1)[0]
        if part.endswith(".dist-info"):
            part = "dist-info"
        by_part[part] = by_part.get(part, 0) + entry_bytes(info)
        kind = os.path.splitext(info.filename)[1]
        by_kind[kind if kind in by_kind else "other"] += entry_bytes(info)
    return dict(sorted(by_part.items(), key=lambda item: -item[1])), by_kind, len(infos)


def build(
    output: Path,
    *,
    python_version: str = DEFAULT_PYTHON_VERSION,
    python: str | None = None,
    sources: bool = True,
    bytecode: bool = True,
    wheels: Path | None = None,
    interpreter: str = "/usr/bin/env python3",
    stored: bool = False,
) -> Report:
    if not re.fullmatch(r"3\.\d+", python_version):
        raise BuildError(f"--python-version: {python_version!r} is not 3.X")
    if not sources and not bytecode:
        raise BuildError("--no-sources and --no-bytecode leave nothing to run")
    if importlib.util.find_spec("pip") is None:
        raise BuildError(f"{sys.executable} has no pip; run this with a Python that has it")
    if bytecode:
        python = python or find_python(python_version)
        found = interpreter_version(python)
        if found != python_version:
            raise BuildError(f"{python} is Python {found}, not {python_version}")
    else:
        python = None
    pyproject = load_toml(REPO / "pyproject.toml")
    pins = pins_for(python_version, pyproject)
    with tempfile.TemporaryDirectory(prefix="build-zipapp-") as temporary:
        work = Path(temporary)
        stage = work / "stage"
        stage.mkdir()
        wheel_dir = wheels or work / "wheels"
        fetch_wheels(pins, python_version, wheel_dir)
        install_wheels(pins, python_version, wheel_dir, stage)
        strip_dependencies(stage)
        copy_petitkexec(pyproject, stage)
        write_dist_info(pyproject, stage)
        built_for = tuple(int(part) for part in python_version.split("."))
        (stage / "__main__.py").write_text(
            MAIN_TEMPLATE.format(built_for=built_for, has_sources=sources)
        )
        if bytecode:
            assert python is not None
            compile_bytecode(python, stage, output.name)
        if not sources:
            for path in stage.rglob("*.py"):
                if path != stage / "__main__.py":  # kept, so that it can name a wrong Python
                    path.unlink()
        normalize_tree(stage)
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(output.name + ".tmp")
        previous_tz = os.environ.get("TZ")
        os.environ["TZ"] = "UTC"  # zip stores local time: build in UTC for the same bytes
        time.tzset()
        try:
            zipapp.create_archive(stage, partial, interpreter=interpreter, compressed=not stored)
        finally:
            if previous_tz is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = previous_tz
            time.tzset()
        partial.replace(output)
    by_part, by_kind, entries = describe(output)
    return Report(
        output,
        output.stat().st_size,
        python_version,
        python,
        sources,
        bytecode,
        tuple(pins),
        by_part,
        by_kind,
        entries,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build-zipapp", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON_VERSION,
        metavar="X.Y",
        help=f"the target's Python [default: {DEFAULT_PYTHON_VERSION}]",
    )
    parser.add_argument(
        "--python", metavar="PATH", help="the X.Y interpreter to compile with [default: found]"
    )
    parser.add_argument(
        "--no-sources", action="store_true", help="bytecode only (runs on X.Y only)"
    )
    parser.add_argument(
        "--no-bytecode", action="store_true", help="sources only (compiled at every start)"
    )
    parser.add_argument(
        "--stored",
        action="store_true",
        help="no deflate: for an image compressed as a whole (an xz initramfs), where it ends\n"
        "up smaller (about 220 KB instead of 340 KB with --no-sources), at 3x the RAM",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="keep the downloaded wheels here and reuse them (no network when all are there)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="[default: dist/petitkexec.pyz]",
    )
    args = parser.parse_args(argv)
    try:
        report = build(
            args.output.absolute(),
            python_version=args.python_version,
            python=args.python,
            sources=not args.no_sources,
            bytecode=not args.no_bytecode,
            wheels=args.wheels.absolute() if args.wheels else None,
            stored=args.stored,
        )
    except BuildError as error:
        print(f"build-zipapp: {error}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
