"""A gzip'd newc cpio writer: the format the kernel unpacks as an initramfs.

Written here rather than by cpio(1) so archives are reproducible (owner root, mtime 0, sorted)
and can hold what a host directory cannot: device nodes such as /dev/console for an
unprivileged build, and files given as bytes (a run's scenario). The format is the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Node:
    """An entry that cannot come from a host directory (e.g. /dev/console)."""

    path: str
    mode: int
    rdev: tuple[int, int] = (0, 0)


CONSOLE = Node("dev/console", stat.S_IFCHR | 0o600, (5, 1))


def _entry(
    out: io.BufferedIOBase,
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    rdev: tuple[int, int] = (0, 0),
) -> None:
    encoded = name.encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def _tree(root: Path) -> Iterable[tuple[str, Path, os.stat_result]]:
    """Every entry below root (relative path, path, lstat), sorted, parents before children."""
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
            yield rel, root / rel, (root / rel).lstat()


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
        for rel, full, st in _tree(root) if root is not None else ():
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(full).encode()
            elif stat.S_ISREG(st.st_mode):
                data = full.read_bytes()
            else:
                data = b""
            _entry(out, ino, rel, st.st_mode, data)
            ino += 1
        for node in nodes:
            _entry(out, ino, node.path, node.mode, rdev=node.rdev)
            ino += 1
        for rel, data in (files or {}).items():
            for parent in reversed(Path(rel).parents[:-1]):
                _entry(out, ino, str(parent), stat.S_IFDIR | 0o755)
                ino += 1
            mode = 0o755 if rel.endswith(".sh") else 0o644
            _entry(out, ino, rel, stat.S_IFREG | mode, data)
            ino += 1
        _entry(out, ino, TRAILER, 0)
        out.flush()
    tmp.replace(out_path)
    return out_path
