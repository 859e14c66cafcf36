"""What petitkexec adds to a bootloader image: the smallest runtime every command needs, measured.

    python bench/firmware_footprint.py [--pkgroot DIR] [--python /usr/bin/python3.11]
                                       [--runtime-dir DIR] [--write-closure]

Debian's ppc64el python3.11 stands in for buildroot's. The runtime is the interpreter, the
standard-library modules some command path imports, the C libraries those need beyond glibc,
and petitkexec.pyz (petitkexec, click, pyudev and structlog as bytecode only), packed into a
newc cpio and compressed with `xz -9 --check=crc32` as a kernel unpacks an initramfs. Prints
an itemised table: each part's size unpacked and its share of the xz stream.

The standard-library closure is found by running, not guessed: every command path runs as
its own process (the archive under `python3.11 -I -S`, as a firmware image starts it) and
dumps sys.modules at exit (closure_of()). Paths that would write to this machine's /sys
(`exec`, `teardown`) are not run here; their modules are covered by importing every
petitkexec module and every name any of them imports, inside functions too, with a warning
logged so that structlog is configured as a run that logs configures it. The PowerNV guest
(tests/vm/test_powernv.py) then boots an image holding only this runtime and runs `plan`,
`exec` and `verify` in it: the proof that the closure is complete.

Modules an import reaches only under `try: ... except ImportError` are left out of the
runtime (OPTIONAL below) and blocked while the closure is found, so the commands are seen to
work without them.

bench/stdlib-closure.txt is the allowed closure; tests/test_import_closure.py fails when a
command starts importing a standard-library module outside it (--write-closure rewrites it).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOSURE_LIST = REPO / "bench" / "stdlib-closure.txt"
SNAPSHOT = REPO / "tests" / "fixtures" / "snapshot-q35.json"
PKGROOT = REPO / ".cache" / "vm" / "powernv" / "pkgroot"
WHEELS = REPO / ".cache" / "vm" / "powernv" / "zipapp-wheels"
TARGET = "powerpc64le-linux-gnu"
BUDGET = int(2.5 * 1024 * 1024)
# Reached only through `try: import X except ImportError`, and never used by what petitkexec
# runs: left out, and blocked while the closure is found so that every command is seen to run
# without them. asyncio (through structlog) falls back to ssl = None and opens no TLS socket;
# shutil and zipfile fall back to no bz2/lzma (petitkexec unpacks no archive); uuid falls back
# to pure Python without _uuid (and so without libuuid).
OPTIONAL = ("ssl", "_ssl", "bz2", "_bz2", "lzma", "_lzma", "_uuid")
# glibc is in every userspace a bootloader has; anything else a needed object links is counted.
GLIBC = ("libc.so", "libm.so", "ld64.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux")

# Run in the measured interpreter: block OPTIONAL, run the archive with argv, and report every
# module loaded at exit with where it came from.
DUMPER = r"""
import json, runpy, sys
OPTIONAL = set(json.loads(sys.argv[1]))
class Block:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in OPTIONAL:
            raise ImportError(f"left out of the firmware runtime: {name}")
sys.meta_path.insert(0, Block)
entries, extra = json.loads(sys.argv[2]), sys.argv[3]
sys.argv = ["petitkexec", *json.loads(extra)]
sys.path[:0] = entries
code = 0
try:
    if sys.argv[1:] == ["--import-everything"]:
        import importlib
        for name in json.loads(sys.stdin.read()):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                # A fallback import (tomli where tomllib is missing): petitkexec's own fail.
                if name.startswith("petitkexec"):
                    raise
        from petitkexec.log import configure_logging, get_logger
        configure_logging(verbose=False)
        get_logger("footprint").warning("closure probe")
    else:
        runpy.run_module("petitkexec", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
report = {
    name: getattr(module, "__file__", None) or ""
    for name, module in list(sys.modules.items())
}
sys.stderr.write("\nCLOSURE " + json.dumps({"exit": code, "modules": report}) + "\n")
"""


def command_paths(scratch: Path) -> dict[str, list[str]]:
    """Every command path that is safe to run on this machine (read-only), by a short name."""
    snapshot_out = scratch / "snapshot.json"
    return {
        "--help": ["--help"],
        "--version": ["--version"],
        "plan": ["plan"],
        "plan --json": ["plan", "--json"],
        "plan -v": ["-v", "plan"],
        "plan --snapshot": ["plan", "--snapshot", str(SNAPSHOT)],
        "snapshot": ["snapshot", "-o", str(snapshot_out)],
        "verify": ["verify", "--against", str(SNAPSHOT)],
        "verify --json": ["verify", "--against", str(SNAPSHOT), "--json"],
        "install-systemd --print": ["install-systemd", "--print"],
        "exec --help": ["exec", "--help"],
        "teardown --help": ["teardown", "--help"],
    }


def imported_names(package: Path) -> list[str]:
    """Every petitkexec module and every absolute module name any of them imports, at module
    level or inside a function (the lazy imports of exec and teardown)."""
    names = {f"petitkexec.{p.stem}" for p in package.glob("*.py") if p.stem != "__main__"}
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return sorted(names - {"__future__"})


def run_dumped(python: str, entries: list[str], args: list[str], stdin: str = "") -> dict[str, str]:
    """Run one command path with `python -I -S`, petitkexec and its dependencies found in
    entries (the archive, or the source tree and site-packages), and return every module it
    had loaded at exit (name -> file, '' when built in)."""
    done = subprocess.run(
        [
            python,
            "-I",
            "-S",
            "-c",
            DUMPER,
            json.dumps(OPTIONAL),
            json.dumps(entries),
            json.dumps(args),
        ],
        input=stdin,
        capture_output=True,
        text=True,
    )
    line = next((x for x in reversed(done.stderr.splitlines()) if x.startswith("CLOSURE ")), None)
    if line is None or "Traceback" in done.stderr:
        raise RuntimeError(f"{args}: no clean module report\n{done.stderr[-3000:]}")
    report = json.loads(line.removeprefix("CLOSURE "))
    return dict(report["modules"])


def stdlib_dir(python: str) -> str:
    return subprocess.run(
        [python, "-I", "-S", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def stdlib_part(modules: dict[str, str], stdlib: str) -> dict[str, str]:
    """name -> file below the stdlib directory ('' for a module built into the interpreter)."""
    part = {}
    for name, file in modules.items():
        if not file:
            part[name] = ""
        elif file.startswith(stdlib + "/"):
            part[name] = file[len(stdlib) + 1 :]
    return part


def closure_of(python: str, entries: list[str]) -> dict[str, dict[str, str]]:
    """Per command path: the stdlib modules it had loaded at exit (name -> relative file)."""
    stdlib = stdlib_dir(python)
    with tempfile.TemporaryDirectory() as scratch:
        found = {
            name: stdlib_part(run_dumped(python, entries, args), stdlib)
            for name, args in command_paths(Path(scratch)).items()
        }
    everything = json.dumps(imported_names(REPO / "petitkexec"))
    found["every import (exec, teardown)"] = stdlib_part(
        run_dumped(python, entries, ["--import-everything"], stdin=everything), stdlib
    )
    return found


def union(per_path: dict[str, dict[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for modules in per_path.values():
        merged.update(modules)
    return merged


def read_closure_list(path: Path = CLOSURE_LIST) -> set[str]:
    return {
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def write_closure_list(names: Iterable[str], path: Path = CLOSURE_LIST) -> None:
    path.write_text(
        "# The standard-library modules petitkexec's commands may import (a firmware image\n"
        "# ships only these): written by `python bench/firmware_footprint.py --write-closure`,\n"
        "# checked by tests/test_import_closure.py.\n" + "".join(f"{n}\n" for n in sorted(names))
    )


# --------------------------------------------------------------------------- the runtime


def target_file(relative: str) -> str:
    """The host's stdlib path of a module -> the same module in the ppc64el package."""
    if relative.startswith("lib-dynload/"):
        stem = relative.split("/")[1].split(".")[0]
        return f"lib-dynload/{stem}.cpython-311-{TARGET}.so"
    return relative


def closure_files(names: Iterable[str], root: Path) -> dict[str, str]:
    """The closure list's names -> their files in the target's stdlib ('' when built into the
    interpreter), the form build_runtime() takes."""
    stdlib = root / "usr" / "lib" / "python3.11"
    files = {}
    for name in names:
        relative = name.replace(".", "/")
        candidates = (
            f"{relative}/__init__.py",
            f"{relative}.py",
            f"lib-dynload/{relative}.cpython-311-{TARGET}.so",
        )
        files[name] = next((c for c in candidates if (stdlib / c).exists()), "")
    return files


def needed_libraries(objects: Iterable[Path], root: Path) -> dict[str, Path]:
    """The shared libraries those ELF objects need, transitively, found in root (no glibc)."""
    search = [root / "lib" / TARGET, root / "usr" / "lib" / TARGET]
    found: dict[str, Path] = {}
    pending = list(objects)
    while pending:
        dynamic = subprocess.run(
            ["readelf", "-d", str(pending.pop())], capture_output=True, text=True, check=True
        ).stdout
        for line in dynamic.splitlines():
            if "(NEEDED)" not in line:
                continue
            soname = line.split("[", 1)[1].rstrip("]")
            if soname in found or soname.startswith(GLIBC):
                continue
            library = next((d / soname for d in search if (d / soname).exists()), None)
            if library is None:
                raise FileNotFoundError(f"{soname} not in {root}")
            found[soname] = library.resolve()
            pending.append(found[soname])
    return found


def compile_stdlib(python: str, sources: dict[str, Path], out: Path) -> None:
    """Each module as bytecode only, next to where its source was (python finds `os.pyc`
    as its landmark and imports sourceless .pyc from the stdlib directory)."""
    jobs = {str(src): str(out / rel) for rel, src in sources.items()}
    script = (
        "import json, py_compile, sys\n"
        "for src, dst in json.load(sys.stdin).items():\n"
        "    py_compile.compile(src, cfile=dst, doraise=True,"
        " invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    subprocess.run(
        [python, "-I", "-S", "-c", script], input=json.dumps(jobs), text=True, check=True
    )


def build_runtime(
    python: str, closure: dict[str, str], archive: Path, root: Path, out: Path
) -> dict[str, list[Path]]:
    """The runtime laid out as the image holds it, below out (usr/bin/python3.11,
    usr/lib/python3.11/..., usr/lib/<triplet>/lib*.so, petitkexec.pyz); returns the
    files of each part."""
    stdlib_root = root / "usr" / "lib" / "python3.11"
    dest = out / "usr" / "lib" / "python3.11"
    parts: dict[str, list[Path]] = {}
    interpreter = out / "usr" / "bin" / "python3.11"
    interpreter.parent.mkdir(parents=True)
    shutil.copy2(root / "usr" / "bin" / "python3.11", interpreter)
    parts["interpreter (usr/bin/python3.11)"] = [interpreter]

    sources: dict[str, Path] = {}
    extensions: list[Path] = []
    for relative in sorted(set(closure.values()) - {""}):
        wanted = target_file(relative)
        if wanted.endswith(".so"):
            copied = dest / wanted
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stdlib_root / wanted, copied)
            extensions.append(copied)
        else:
            sources[wanted.removesuffix(".py") + ".pyc"] = stdlib_root / wanted
    for pyc in sources:
        (dest / pyc).parent.mkdir(parents=True, exist_ok=True)
    compile_stdlib(python, sources, dest)
    # The landmark getpath looks for (os.py or os.pyc), so that prefix is found from the binary.
    assert (dest / "os.pyc").exists(), "os is always in the closure"
    parts["stdlib bytecode (.pyc)"] = sorted(dest / p for p in sources)
    parts["stdlib extension modules (lib-dynload)"] = extensions

    libraries = needed_libraries([interpreter, *extensions], root)
    libdir = out / "usr" / "lib" / TARGET
    libdir.mkdir(parents=True)
    parts["C libraries beyond glibc"] = []
    for soname, library in sorted(libraries.items()):
        shutil.copy2(library, libdir / soname)
        parts["C libraries beyond glibc"].append(libdir / soname)

    shutil.copy2(archive, out / "petitkexec.pyz")
    parts["petitkexec.pyz (petitkexec, click, pyudev, structlog; .pyc only)"] = [
        out / "petitkexec.pyz"
    ]
    return parts


def _newc(ino: int, name: str, mode: int, data: bytes = b"") -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return header + b"\0" * (-len(header) % 4) + data + b"\0" * (-len(data) % 4)


def cpio(out: Path, files: Iterable[Path]) -> bytes:
    """A newc cpio (what the kernel unpacks) of those files and their directories, relative
    to out, owned by root with mtime 0."""
    members: set[Path] = set()
    for file in files:
        relative = file.relative_to(out)
        members.add(relative)
        members.update(p for p in relative.parents if p != Path("."))
    archive = bytearray()
    for ino, member in enumerate(sorted(members, key=lambda p: (len(p.parts), str(p))), 1):
        full = out / member
        if full.is_dir():
            archive += _newc(ino, str(member), 0o40755)
        else:
            archive += _newc(
                ino, str(member), 0o100000 | (full.stat().st_mode & 0o777), full.read_bytes()
            )
    return bytes(archive + _newc(len(members) + 1, "TRAILER!!!", 0))


def xz_size(data: bytes) -> int:
    """`xz -9 --check=crc32` as an initramfs is compressed (the kernel's XZ decoder takes
    CRC32 or no check)."""
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=9))


def build_archive(python_version: str, out: Path) -> Path:
    archive = out / "petitkexec.pyz"
    subprocess.run(
        [
            str(REPO / "scripts" / "build-zipapp"),
            "--python-version",
            python_version,
            "--no-sources",
            # No deflate: the image is compressed as a whole, and xz does better on the
            # bytecode itself than on deflated bytecode.
            "--stored",
            "--wheels",
            str(WHEELS),
            "-o",
            str(archive),
        ],
        check=True,
        capture_output=True,
    )
    return archive


def measure(python: str, root: Path, runtime_dir: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Build the runtime into runtime_dir; per part (unpacked bytes, xz bytes alone) and the
    xz size of the whole."""
    scratch = Path(tempfile.mkdtemp())
    try:
        archive = build_archive("3.11", scratch)
        closure = union(closure_of(python, [str(archive)]))
        parts = build_runtime(python, closure, archive, root, runtime_dir)
    finally:
        shutil.rmtree(scratch)
    table = {
        name: (sum(f.stat().st_size for f in files), xz_size(cpio(runtime_dir, files)))
        for name, files in parts.items()
    }
    every = [f for files in parts.values() for f in files]
    return table, xz_size(cpio(runtime_dir, every))


def render(table: dict[str, tuple[int, int]], total_xz: int) -> str:
    out = io.StringIO()
    out.write(f"{'part':<66} {'unpacked KiB':>12} {'xz -9 KiB':>10}\n")
    for name, (raw, packed) in table.items():
        out.write(f"{name:<66} {raw / 1024:>12.1f} {packed / 1024:>10.1f}\n")
    raw_total = sum(raw for raw, _ in table.values())
    out.write(
        f"{'all, one xz stream (what the image grows by)':<66} "
        f"{raw_total / 1024:>12.1f} {total_xz / 1024:>10.1f}\n"
    )
    verdict = "within" if total_xz <= BUDGET else "OVER"
    out.write(f"budget 2.5 MiB: {verdict} ({total_xz / 1024 / 1024:.2f} MiB)\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pkgroot", type=Path, default=PKGROOT, help="unpacked ppc64el debs")
    parser.add_argument("--python", default="/usr/bin/python3.11", help="host python3.11")
    parser.add_argument("--runtime-dir", type=Path, help="keep the runtime here (else temporary)")
    parser.add_argument(
        "--write-closure", action="store_true", help="rewrite bench/stdlib-closure.txt"
    )
    args = parser.parse_args(argv)
    if args.write_closure:
        scratch = Path(tempfile.mkdtemp())
        try:
            per_path = closure_of(args.python, [str(build_archive("3.11", scratch))])
        finally:
            shutil.rmtree(scratch)
        write_closure_list(union(per_path))
        for name, modules in per_path.items():
            print(f"{name}: {len(modules)} stdlib modules")
        return 0
    keep = args.runtime_dir
    runtime_dir = keep or Path(tempfile.mkdtemp()) / "runtime"
    if keep and keep.exists():
        shutil.rmtree(keep)
    try:
        table, total = measure(args.python, args.pkgroot, runtime_dir)
    finally:
        if keep is None:
            shutil.rmtree(runtime_dir.parent)
    print(render(table, total), end="")
    return 0 if total <= BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
