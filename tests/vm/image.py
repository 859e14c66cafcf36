"""Guest images for the real-kernel lane, built from Debian packages only.

Everything comes from ``apt-get download`` + ``dpkg-deb -x`` (no network besides Debian's
archive and PyPI for petitkexec's dependencies) and is cached under ``<repo>/.cache/vm/``:

- ``debs/``       the downloaded packages (the kernel, busybox, kexec-tools, python3.11, ...
                  and the library packages they depend on);
- ``pkgroot/``    all of them unpacked into one tree, with ``depmod`` run on the host;
- ``build-<key>/`` the kernel, the stage-1 initramfs base (everything but petitkexec), the
                  second kernel's initramfs, and petitkexec's dependencies as a layer; ``key``
                  hashes this file, ``guest/`` and the package list, so editing either rebuilds;
- ``session/``    petitkexec itself, installed from the working tree: rebuilt once per process
                  (= once per pytest session), because the tree changes under test.

All of it is done by lane: a `Lane` names what differs (architecture, packages, modules, how
to reach apt, the kernel's file name, the cache subdirectory). `X86` is the q35 lane's;
powernv.py defines the PowerNV lane's, cached under ``.cache/vm/powernv/`` the same way.

An initramfs is a gzip'd newc cpio; the kernel unpacks concatenated archives in order, so a
boot's initrd is ``stage1-base + deps + project + the run's own layer`` (see guest.py).

Usage: ``python -m tests.vm.image [--force] [--json]`` (or ``python tests/vm/image.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GUEST_SCRIPTS = HERE / "guest"

KERNEL_SERIES = "6.1."
# Packages wanted for what they ship; the library packages they depend on are added by
# following Depends/Pre-Depends into lib* packages (see fetch_packages). Every lane's guest
# has the BASE_PACKAGES; the q35 lane's has more.
BASE_PACKAGES = (
    "libc6",
    "libc-bin",  # /sbin/ldconfig: ctypes.util.find_library runs `ldconfig -p` (pyudev)
    "busybox-static",
    "kexec-tools",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libudev1",
)
ROOT_PACKAGES = (
    *BASE_PACKAGES,
    "umockdev",
    "libumockdev0",
    "udev",  # only its udevadm binary: umockdev-record runs `udevadm info`
    "nvme-cli",
)
# Modules loaded (in dependency order) by both guest kernels. pcieport and shpchp are built in.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_net",
    "virtio_rng",
    "nvme",
    "crc64_rocksoft_generic",
    "crct10dif_generic",
    "e1000e",
    "e1000",
    "xhci_pci",
    "ahci",
    "sd_mod",
    "9pnet_virtio",
    "9p",
    "crc32c_generic",
    "ext4",
)
# Debian's stdlib minus what a guest never imports.
STDLIB_DROP = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "unittest",
        "sqlite3",
        "dbm",
        "curses",
        "venv",
        "turtle.py",
        "pydoc.py",
        "doctest.py",
        "EXTERNALLY-MANAGED",
        "LICENSE.txt",
    }
)
LIB_DYNLOAD_DROP = re.compile(
    r"^(_test|_ctypes_test|_xx|xxlimited|_curses|_dbm|_gdbm|_sqlite3|readline|nis|ossaudiodev"
    r"|_crypt|audioop|_tkinter)"
)
GUEST_SITE_PACKAGES = "usr/lib/python3/dist-packages"
FALLBACK_DEPENDENCIES = ("click>=8.1", "pyudev>=0.24", "structlog>=23.1")
FALLBACK_ENTRY_POINT = "petitkexec.cli:main"


def log(message: str) -> None:
    print(f"[vm-image] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("PETITKEXEC_VM_CACHE") or REPO_ROOT / ".cache" / "vm")


class ImageError(RuntimeError):
    pass


def _run(args: list[str], *, cwd: Path | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if check and proc.returncode != 0:
        raise ImageError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


# --------------------------------------------------------------------------- lanes


@dataclasses.dataclass(frozen=True)
class Lane:
    """What one lane's guest images are made of. How they are made is the same for every lane."""

    name: str
    arch: str  # Debian's architecture name
    triplet: str  # the multiarch library directory
    dynamic_loader: str
    kernel_flavour: str  # the kernel comes from linux-image-<flavour>
    kernel_file: str  # the kernel's name in /boot (<name>-<version>) and in build-<key>/
    root_packages: tuple[str, ...]
    guest_modules: tuple[str, ...]  # loaded by both kernels, with their dependencies
    cache_subdir: str = ""  # below cache_dir()
    # More for stage 1: scripts from guest/ (in /usr/bin), binaries with their libraries, links.
    stage1_scripts: tuple[str, ...] = ()
    stage1_programs: tuple[str, ...] = ()
    stage1_links: tuple[tuple[str, str], ...] = ()
    # None: the host runs the guest's busybox and ldconfig (applets linked and ld cache built
    # here). Otherwise this /init does both at boot, then runs the common init (/etc/pk-init).
    boot_init: Path | None = None
    # None: the host's apt, whose lists the host keeps fresh (.ci/run). Otherwise the
    # environment of a private APT_CONFIG, and how to refresh its lists (force, else if stale).
    apt_env: Callable[[], dict[str, str]] | None = None
    update_lists: Callable[[bool], None] | None = None
    sources: tuple[Path, ...] = ()  # more files (or folders) that shape the base images

    def cache(self) -> Path:
        return cache_dir() / self.cache_subdir

    @property
    def lib_dirs(self) -> tuple[str, ...]:
        return (f"lib/{self.triplet}", f"usr/lib/{self.triplet}", "lib64", "lib", "usr/lib")


X86 = Lane(
    name="x86",
    arch="amd64",
    triplet="x86_64-linux-gnu",
    dynamic_loader="lib64/ld-linux-x86-64.so.2",
    kernel_flavour="amd64",
    kernel_file="vmlinuz",
    root_packages=ROOT_PACKAGES,
    guest_modules=GUEST_MODULES,
    stage1_scripts=("setup-sriov",),
    # umockdev-record runs `udevadm info`; nvme-cli for the scenarios.
    stage1_programs=("usr/bin/umockdev-record", "bin/udevadm", "usr/sbin/nvme"),
    stage1_links=(("usr/bin/udevadm", "/bin/udevadm"),),
)


@functools.cache
def _sources_hash(lane: Lane) -> str:
    """Hash of everything that shapes a lane's cached images (this file, the guest scripts and
    the lane's own sources)."""
    files = [Path(__file__).resolve(), *sorted(GUEST_SCRIPTS.iterdir())]
    for source in lane.sources:
        files += sorted(source.iterdir()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- packages


def apt(
    lane: Lane, args: list[str], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """apt-get/apt-cache as the lane reaches apt (unchecked)."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=None if lane.apt_env is None else lane.apt_env(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def kernel_package(lane: Lane = X86) -> str:
    """The exact Debian 12 kernel package behind linux-image-<flavour> (linux-image-6.1.*-...).
    A private apt's lists are refreshed first when stale, and again if they name no kernel."""
    meta = f"linux-image-{lane.kernel_flavour}"
    for attempt in range(1 if lane.update_lists is None else 2):
        if lane.update_lists is not None:
            lane.update_lists(attempt > 0)
        out = apt(lane, ["apt-cache", "depends", meta]).stdout
        names = re.findall(rf"Depends:\s*(linux-image-\S+-{lane.kernel_flavour})", out)
        if names:
            return str(names[0])
    hint = "" if lane.update_lists else "; run `apt-get update` (see .ci/apt-packages)"
    raise ImageError(f"apt-cache depends {meta} ({lane.arch}) names no kernel{hint}")


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _parse_depends(value: str) -> list[str]:
    """Library package names from a Depends value; of alternatives the first library one."""
    names = []
    for clause in filter(None, (c.strip() for c in value.split(","))):
        for alternative in clause.split("|"):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            if name.startswith("lib") or name == "zlib1g":
                names.append(name)
                break
    return names


def _download(lane: Lane, names: Iterable[str], debs: Path, roots: list[str]) -> None:
    names = sorted(set(names))
    if not names or apt(lane, ["apt-get", "download", *names], cwd=debs).returncode == 0:
        return
    # One unknown (virtual) name fails the batch: retry one by one, give up only on roots.
    for name in names:
        one = apt(lane, ["apt-get", "download", name], cwd=debs)
        if one.returncode != 0:
            if name in roots:
                raise ImageError(f"apt-get download {name} ({lane.arch}) failed:\n{one.stderr}")
            log(f"skipping dependency {name}: {one.stderr.strip().splitlines()[-1:]}")


def fetch_packages(debs: Path, lane: Lane = X86) -> dict[str, Path]:
    """Download the lane's root packages and their library closure; return {package: .deb}.

    A manifest pins what was downloaded, so later runs reuse the same files. The host's apt is
    asked for the kernel every time (a newer one replaces the set); with a private apt, whose
    lists are refreshed only when needed, the set stays pinned until the root packages change.
    """
    debs.mkdir(parents=True, exist_ok=True)
    manifest_path = debs / "manifest.json"
    roots = None if lane.update_lists else [kernel_package(lane), *lane.root_packages]
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        pinned = manifest.get("roots", [])
        current = pinned == roots if roots else pinned[1:] == list(lane.root_packages)
        if current and all((debs / f).exists() for f in manifest["packages"].values()):
            return {name: debs / f for name, f in manifest["packages"].items()}
    started = time.monotonic()
    roots = roots or [kernel_package(lane), *lane.root_packages]
    for stale in debs.glob("*.deb"):
        stale.unlink()
    have: dict[str, Path] = {}
    asked: set[str] = set()
    todo = set(roots)
    while todo:
        _download(lane, todo, debs, roots)
        asked |= todo
        for deb in debs.glob("*.deb"):
            have.setdefault(deb.name.split("_", 1)[0], deb)
        new: set[str] = set()
        for name in todo & set(have):
            for field in ("Pre-Depends", "Depends"):
                new.update(_parse_depends(_deb_field(have[name], field)))
        # Names asked for that never arrived (virtual packages) are not asked again.
        todo = new - set(have) - asked
    packages = {name: deb.name for name, deb in sorted(have.items())}
    manifest_path.write_text(json.dumps({"roots": roots, "packages": packages}, indent=1))
    log(f"downloaded {len(packages)} {lane.arch} packages in {time.monotonic() - started:.1f}s")
    return {name: debs / f for name, f in packages.items()}


def unpack_packages(packages: dict[str, Path], pkgroot: Path) -> Path:
    """dpkg-deb -x every package into one tree (cached by the list of .deb files)."""
    stamp = pkgroot / ".unpacked"
    want = "\n".join(sorted(p.name for p in packages.values()))
    if stamp.exists() and stamp.read_text() == want:
        return pkgroot
    started = time.monotonic()
    if pkgroot.exists():
        shutil.rmtree(pkgroot)
    pkgroot.mkdir(parents=True)
    for deb in packages.values():
        _run(["dpkg-deb", "-x", str(deb), str(pkgroot)])
    stamp.write_text(want)
    log(f"unpacked {len(packages)} packages in {time.monotonic() - started:.1f}s")
    return pkgroot


def kernel_version(pkgroot: Path) -> str:
    versions = sorted(p.name for p in (pkgroot / "lib/modules").iterdir() if p.is_dir())
    if not versions:
        versions = sorted(p.name for p in (pkgroot / "usr/lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1 or not versions[0].startswith(KERNEL_SERIES):
        raise ImageError(f"expected one {KERNEL_SERIES}* kernel in {pkgroot}, found {versions}")
    return versions[0]


def _modules_dir(pkgroot: Path, kver: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        if (pkgroot / base / kver).is_dir():
            return pkgroot / base / kver
    raise ImageError(f"no modules for {kver} in {pkgroot}")


def module_load_order(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to the modules dir) of `names` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists the full closure, deepest last: load from the end.
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageError(f"module {name} not in {modules_dir}/modules.dep")
        visit(by_name[key])
    return order


# --------------------------------------------------------------------------- ELF closure


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF file ([] for anything else)."""
    with path.open("rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []

    def file_offset(vaddr: int) -> int:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return int(vaddr - start + offset)
        raise ImageError(f"{path}: address {vaddr:#x} outside PT_LOAD")

    needed, strtab = [], None
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:
            needed.append(val)
        elif tag == 5:
            strtab = file_offset(val)
    if strtab is None:
        return []
    return [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed]


class RootBuilder:
    """A guest root assembled from files of the unpacked packages (pkgroot)."""

    def __init__(self, pkgroot: Path, root: Path, lane: Lane) -> None:
        self.pkgroot = pkgroot
        self.root = root
        self.lane = lane
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for d in (
            "bin",
            "sbin",
            "usr/bin",
            "usr/sbin",
            "etc",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "root",
            "mnt",
            "boot",
            "var/tmp",
            f"lib/{lane.triplet}",
            "lib64",
        ):
            (root / d).mkdir(parents=True, exist_ok=True)

    def add(self, rel: str) -> str:
        """Copy pkgroot/rel into the root, following symlink chains and keeping the links.

        Returns the root-relative path of the file the chain ends at.
        """
        rel = rel.lstrip("/")
        src, dst = self.pkgroot / rel, self.root / rel
        if not src.is_symlink() and not src.exists():
            raise ImageError(f"{rel} is in no downloaded package")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target = os.readlink(src)
            if not dst.is_symlink():
                os.symlink(target, dst)
            resolved = (
                target.lstrip("/")
                if target.startswith("/")
                else os.path.normpath(os.path.join(os.path.dirname(rel), target))
            )
            return self.add(resolved)
        if src.is_dir():
            dst.mkdir(exist_ok=True)
        elif not dst.exists():
            shutil.copy2(src, dst)
        return rel

    def add_tree(self, rel: str, keep: Callable[[str], bool] = lambda _: True) -> None:
        base = self.pkgroot / rel
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if keep(os.path.join(dirpath, d)))
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if keep(full):
                    self.add(os.path.relpath(full, self.pkgroot))

    def find_library(self, soname: str) -> str:
        for d in self.lane.lib_dirs:
            if (self.pkgroot / d / soname).exists():
                return f"{d}/{soname}"
        raise ImageError(
            f"library {soname} is in no downloaded {self.lane.arch} package (add its package)"
        )

    def add_elf_closure(self, *rels: str) -> None:
        """Add binaries and every library they need, recursively (what ldd would name)."""
        todo = [r.lstrip("/") for r in rels]
        todo.append(self.lane.dynamic_loader)
        seen: set[str] = set()
        while todo:
            rel = todo.pop()
            if rel in seen:
                continue
            seen.add(rel)
            real = self.add(rel)
            for soname in elf_needed(self.root / real):
                todo.append(self.find_library(soname))

    def write(self, rel: str, content: str | bytes, mode: int = 0o644) -> None:
        dst = self.root / rel.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(content.encode() if isinstance(content, str) else content)
        dst.chmod(mode)

    def symlink(self, rel: str, target: str) -> None:
        dst = self.root / rel.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_symlink() and not dst.exists():
            os.symlink(target, dst)


def _install_busybox(rb: RootBuilder) -> None:
    rb.add("bin/busybox")
    if rb.lane.boot_init is not None:  # it links the applets at boot
        rb.symlink("bin/sh", "busybox")
        return
    applets = _run([str(rb.pkgroot / "bin/busybox"), "--list-full"]).split()
    for applet in applets:
        rb.symlink(applet, "/bin/busybox")


def _install_guest_scripts(
    rb: RootBuilder, init: str, kver: str, modules: list[str], modules_dir: Path
) -> None:
    """busybox and the guest scripts, with `init` (init-stage1 or init-second) as /init or,
    behind the lane's boot_init, as /etc/pk-init."""
    _install_busybox(rb)
    if rb.lane.boot_init is None:
        rb.write("init", (GUEST_SCRIPTS / init).read_text(), 0o755)
    else:
        rb.write("etc/pk-init", (GUEST_SCRIPTS / init).read_text(), 0o755)
        rb.write("init", rb.lane.boot_init.read_text(), 0o755)
    rb.write("etc/pk-lib.sh", (GUEST_SCRIPTS / "lib.sh").read_text())
    rb.write("usr/bin/readback", (GUEST_SCRIPTS / "readback").read_text(), 0o755)
    rb.write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    rb.write("etc/group", "root:x:0:\n")
    rb.write("etc/modules.load", "\n".join(modules) + "\n")
    dest = rb.root / "lib/modules" / kver
    dest.mkdir(parents=True, exist_ok=True)
    for name in modules_dir.iterdir():
        if name.is_file() and name.name.startswith("modules."):
            shutil.copy2(name, dest / name.name)
    for ko in modules:
        (dest / ko).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(modules_dir / ko, dest / ko)


# --------------------------------------------------------------------------- cpio


@dataclasses.dataclass(frozen=True)
class Node:
    """An entry that cannot come from a host directory (e.g. /dev/console)."""

    path: str
    mode: int
    rdev: tuple[int, int] = (0, 0)


def _cpio_entry(
    out: io.BufferedIOBase,
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    rdev: tuple[int, int] = (0, 0),
) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def write_cpio(
    root: Path | None,
    out_path: Path,
    *,
    nodes: Iterable[Node] = (),
    files: dict[str, bytes] | None = None,
    level: int = 6,
) -> Path:
    """Write a gzip'd newc archive of `root` (owner root, mtime 0) plus extra nodes/files."""
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    ino = 1
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz,
    ):
        out = io.BufferedWriter(gz, 1 << 20)
        if root is not None:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, root)
                entries = [] if rel_dir == "." else [rel_dir]
                entries += [os.path.normpath(os.path.join(rel_dir, f)) for f in sorted(filenames)]
                # Symlinks to directories show up in dirnames and are not walked into.
                entries += [
                    os.path.normpath(os.path.join(rel_dir, d))
                    for d in dirnames
                    if os.path.islink(os.path.join(dirpath, d))
                ]
                for rel in entries:
                    full = root / rel
                    st = full.lstat()
                    if stat.S_ISLNK(st.st_mode):
                        data = os.readlink(full).encode()
                    elif stat.S_ISREG(st.st_mode):
                        data = full.read_bytes()
                    else:
                        data = b""
                    _cpio_entry(out, ino, rel, st.st_mode, data)
                    ino += 1
        for node in nodes:
            _cpio_entry(out, ino, node.path, node.mode, rdev=node.rdev)
            ino += 1
        for rel, data in (files or {}).items():
            for parent in reversed(Path(rel).parents[:-1]):
                _cpio_entry(out, ino, str(parent), stat.S_IFDIR | 0o755)
                ino += 1
            mode = 0o755 if rel.endswith(".sh") else 0o644
            _cpio_entry(out, ino, rel, stat.S_IFREG | mode, data)
            ino += 1
        _cpio_entry(out, ino, "TRAILER!!!", 0)
        out.flush()
    tmp.replace(out_path)
    return out_path


CONSOLE = Node("dev/console", stat.S_IFCHR | 0o600, (5, 1))
DEV_DIR = Node("dev", stat.S_IFDIR | 0o755)


# --------------------------------------------------------------------------- python


def _python311() -> str | None:
    """A host python3.11 to precompile with (same bytecode as the guest's Debian 3.11)."""
    for candidate in ("/usr/bin/python3.11", shutil.which("python3.11"), sys.executable):
        if not candidate or not os.path.exists(candidate):
            continue
        out = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if out == "(3, 11)":
            return candidate
    return None


def compile_tree(root: Path, rel: str) -> bool:
    python = _python311()
    if python is None:
        log("no host python3.11: guest Python will compile on import (slower)")
        return False
    _run(
        [
            python,
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            str(root / rel),
        ]
    )
    return True


def _install_python(rb: RootBuilder) -> None:
    rb.add_elf_closure("usr/bin/python3.11")
    rb.symlink("usr/bin/python3", "python3.11")
    rb.add_tree("etc/python3.11")
    stdlib = rb.pkgroot / "usr/lib/python3.11"
    config = f"config-3.11-{rb.lane.triplet}"

    def keep(full: str) -> bool:
        rel = os.path.relpath(full, stdlib)
        top = rel.split(os.sep, 1)[0]
        if top in STDLIB_DROP or top == config or "__pycache__" in rel.split(os.sep):
            return False
        dropped_extension = top == "lib-dynload" and LIB_DYNLOAD_DROP.match(os.path.basename(rel))
        return not dropped_extension

    rb.add_tree("usr/lib/python3.11", keep)
    rb.add_elf_closure(
        *(
            str(p.relative_to(rb.root))
            for p in sorted((rb.root / "usr/lib/python3.11/lib-dynload").glob("*.so"))
        )
    )
    (rb.root / GUEST_SITE_PACKAGES).mkdir(parents=True, exist_ok=True)


def _ldconfig(rb: RootBuilder) -> None:
    """ld.so.conf, and the ld cache when the host can build it (else the lane's boot_init)."""
    triplet = rb.lane.triplet
    rb.write("etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    rb.write(f"etc/ld.so.conf.d/{triplet}.conf", f"/lib/{triplet}\n/usr/lib/{triplet}\n")
    if rb.lane.boot_init is not None:
        return
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    _run([ldconfig, "-r", str(rb.root)])
    if not (rb.root / "etc/ld.so.cache").exists():
        raise ImageError("ldconfig -r wrote no ld.so.cache")


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
        if (
            subprocess.run(
                [python, "-m", "pip", "--version"], capture_output=True, check=False
            ).returncode
            == 0
        ):
            return [python, "-m", "pip"]
    raise ImageError("no pip on this host: apt-get install python3-pip (see .ci/apt-packages)")


def _pip_install(target: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
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
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
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


WRAPPER = """#!/bin/sh
# petitkexec, installed from the working tree by tests/vm/image.py ({how}).
exec /usr/bin/python3.11 -c 'import sys; sys.argv[0] = "petitkexec"
try:
    from {module} import {func} as main
except ImportError as error:
    print("petitkexec is not installed in this guest image:", error, file=sys.stderr)
    sys.exit(127)
sys.exit(main())' "$@"
"""


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
            shutil.copytree(
                REPO_ROOT,
                work,
                ignore=shutil.ignore_patterns(
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
                ),
            )
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


# --------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class Images:
    """What a boot needs. `stage1_layers` concatenated (+ a run's layer) is the initrd."""

    kernel: Path
    kernel_version: str
    kernel_package: str
    stage1_base: Path
    second_base: Path
    deps_layer: Path
    project_layer: Path
    project_install: str  # "pip", "copied" or "missing"
    build_dir: Path
    info: dict[str, Any]

    @property
    def stage1_layers(self) -> list[Path]:
        return [self.stage1_base, self.deps_layer, self.project_layer]


def _build_second(
    lane: Lane, pkgroot: Path, build: Path, kver: str, modules: list[str], modules_dir: Path
) -> Path:
    rb = RootBuilder(pkgroot, build / "second-root", lane)
    _install_guest_scripts(rb, "init-second", kver, modules, modules_dir)
    out = write_cpio(rb.root, build / "second-base.cpio.gz", nodes=[CONSOLE], level=9)
    shutil.rmtree(rb.root)
    return out


def _build_stage1(
    lane: Lane,
    pkgroot: Path,
    build: Path,
    kver: str,
    modules: list[str],
    modules_dir: Path,
    kernel: Path,
    second: Path,
) -> Path:
    rb = RootBuilder(pkgroot, build / "stage1-root", lane)
    _install_guest_scripts(rb, "init-stage1", kver, modules, modules_dir)
    rb.write("usr/sbin/kexec-readback", (GUEST_SCRIPTS / "kexec-readback").read_text(), 0o755)
    for script in lane.stage1_scripts:
        rb.write(f"usr/bin/{script}", (GUEST_SCRIPTS / script).read_text(), 0o755)
    rb.add_elf_closure("sbin/kexec")
    rb.symlink("usr/sbin/kexec", "/sbin/kexec")
    _install_python(rb)
    # pyudev loads libudev through ctypes.util.find_library("udev"), which parses the output
    # of `/sbin/ldconfig -p`: it needs both the ld cache and the ldconfig binary.
    rb.add_elf_closure(f"usr/lib/{lane.triplet}/libudev.so.1", "sbin/ldconfig")
    if lane.stage1_programs:
        rb.add_elf_closure(*lane.stage1_programs)
    for link, target in lane.stage1_links:
        rb.symlink(link, target)
    shutil.copy2(kernel, rb.root / "boot/vmlinuz")  # the name the guest scripts load
    shutil.copy2(second, rb.root / "boot/second-base.cpio.gz")
    _ldconfig(rb)
    compile_tree(rb.root, "usr/lib/python3.11")
    out = write_cpio(rb.root, build / "stage1-base.cpio.gz", nodes=[CONSOLE], level=6)
    shutil.rmtree(rb.root)
    return out


def build_images(*, force: bool = False, project: bool = True, lane: Lane = X86) -> Images:
    """Build (or reuse) the cached images; rebuild the petitkexec layer unless project=False."""
    cache = lane.cache()
    cache.mkdir(parents=True, exist_ok=True)
    # Two test runs in one checkout would otherwise delete each other's half-built images.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_images(lane, cache, force=force, project=project)


def _build_images(lane: Lane, cache: Path, *, force: bool, project: bool) -> Images:
    started = time.monotonic()
    packages = fetch_packages(cache / "debs", lane)
    flavour = f"-{lane.kernel_flavour}"
    kpkg = next(n for n in packages if n.startswith("linux-image-") and n.endswith(flavour))
    deb_names = sorted(p.name for p in packages.values())
    key = hashlib.sha256(
        json.dumps([_sources_hash(lane), deb_names, lane.guest_modules]).encode()
    ).hexdigest()[:12]
    build = cache / f"build-{key}"
    info_path = build / "info.json"
    if force or not info_path.exists():
        t0 = time.monotonic()
        pkgroot = unpack_packages(packages, cache / "pkgroot")
        kver = kernel_version(pkgroot)
        modules_dir = _modules_dir(pkgroot, kver)
        if not (modules_dir / "modules.dep").exists():
            # Debian does not ship modules.dep; generate it the way the postinst would.
            base = modules_dir.parent.parent.parent
            _run(["depmod", "-b", str(base), kver])
        modules = module_load_order(modules_dir, lane.guest_modules)
        for old in cache.glob("build-*"):
            if old != build:
                shutil.rmtree(old, ignore_errors=True)
        if build.exists():
            shutil.rmtree(build)
        build.mkdir()
        kernel = build / lane.kernel_file
        shutil.copy2(pkgroot / "boot" / f"{lane.kernel_file}-{kver}", kernel)
        second = _build_second(lane, pkgroot, build, kver, modules, modules_dir)
        stage1 = _build_stage1(lane, pkgroot, build, kver, modules, modules_dir, kernel, second)
        info = {
            "kernel_version": kver,
            "kernel_package": kpkg,
            "packages": deb_names,
            "modules": modules,
            "sizes": {p.name: p.stat().st_size for p in (kernel, second, stage1)},
            "base_build_seconds": round(time.monotonic() - t0, 1),
        }
        info_path.write_text(json.dumps(info, indent=1))
        log(f"built base images in {build} in {info['base_build_seconds']}s")
    info = json.loads(info_path.read_text())

    deps_key = hashlib.sha256(json.dumps(project_dependencies()).encode()).hexdigest()[:12]
    deps_layer = build / f"deps-{deps_key}.cpio.gz"
    if force or not deps_layer.exists():
        t0 = time.monotonic()
        for old in build.glob("deps-*.cpio.gz"):
            old.unlink()
        build_deps_layer(deps_layer)  # pure-Python wheels: the same on every architecture
        log(f"built the dependency layer in {time.monotonic() - t0:.1f}s")

    session = cache / "session"
    session.mkdir(exist_ok=True)
    project_layer = session / "project.cpio.gz"
    how = (session / "project.how").read_text() if (session / "project.how").exists() else "?"
    if project or not project_layer.exists():
        t0 = time.monotonic()
        project_layer, how = build_project_layer(project_layer)
        (session / "project.how").write_text(how)
        log(f"built the petitkexec layer ({how}) in {time.monotonic() - t0:.1f}s")
    log(f"{lane.name} images ready in {time.monotonic() - started:.1f}s")
    return Images(
        kernel=build / lane.kernel_file,
        kernel_version=info["kernel_version"],
        kernel_package=info["kernel_package"],
        stage1_base=build / "stage1-base.cpio.gz",
        second_base=build / "second-base.cpio.gz",
        deps_layer=deps_layer,
        project_layer=project_layer,
        project_install=how,
        build_dir=build,
        info=info,
    )


_CURRENT: dict[str, Images] = {}


def current_images(lane: Lane = X86) -> Images:
    """The lane's images for this process: built once, petitkexec layer fresh from the tree."""
    if lane.name not in _CURRENT:
        _CURRENT[lane.name] = build_images(lane=lane)
    return _CURRENT[lane.name]


def make_ext4_image(path: Path, files: dict[str, str | bytes], size_mb: int = 64) -> Path:
    """A raw disk image holding an ext4 file system with `files` (host mke2fs -d)."""
    with tempfile.TemporaryDirectory() as tmp:
        for rel, content in files.items():
            dst = Path(tmp) / rel.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(content.encode() if isinstance(content, str) else content)
        with open(path, "wb") as f:
            f.truncate(size_mb << 20)
        mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
        _run([mke2fs, "-q", "-F", "-t", "ext4", "-L", "pkxtest", "-d", tmp, str(path)])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild the cached images too")
    parser.add_argument(
        "--no-project", action="store_true", help="do not rebuild the petitkexec layer"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    images = build_images(force=args.force, project=not args.no_project)
    result = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in dataclasses.asdict(images).items()
        if k != "info"
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    result["sizes"] = {p.name: p.stat().st_size for p in (images.kernel, *images.stage1_layers)}
    print(
        json.dumps(result, indent=1)
        if args.json
        else "\n".join(f"{k}: {v}" for k, v in result.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
