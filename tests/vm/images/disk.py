"""Disk images for the guest's nvme namespace (`boot(..., nvme_image=...)`), with files on them.

Not part of the initramfs: a test makes one to see what a mounted file system does to the
teardown, or what the second kernel can still read.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .run import run


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
        run([mke2fs, "-q", "-F", "-t", "ext4", "-L", "pkxtest", "-d", tmp, str(path)])
    return path
