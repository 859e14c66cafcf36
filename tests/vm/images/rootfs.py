"""A guest root assembled from files of the unpacked packages (pkgroot), with the libraries
its binaries need.

Nothing of the guest runs on the build host (a ppc64el guest could not), so the libraries a
binary needs are read from its ELF dynamic section by `readelf --dynamic` (binutils), which
reads any architecture's ELF, and looked up in the lane's library folders of pkgroot.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .lanes import Lane
from .run import ImageError, run

# `readelf --dynamic` prints one line per DT_NEEDED entry (elf(5)), e.g.
#  0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")
_BASE_LAYOUT = (
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
    "lib64",
)


def needed_libraries(path: Path) -> list[str]:
    """The sonames an ELF file names as DT_NEEDED ([] for a static binary)."""
    out = run(["readelf", "--dynamic", str(path)], env={**os.environ, "LC_ALL": "C"}).stdout
    return _NEEDED.findall(out)


class RootBuilder:
    """A guest root assembled from files of the unpacked packages (pkgroot)."""

    def __init__(self, pkgroot: Path, root: Path, lane: Lane) -> None:
        self.pkgroot = pkgroot
        self.root = root
        self.lane = lane
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for d in (*_BASE_LAYOUT, f"lib/{lane.triplet}"):
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
            for soname in needed_libraries(self.root / real):
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
