"""The guest's Python: Debian's python3.11 trimmed to what a guest imports, precompiled.

The stage-1 guest runs petitkexec on Debian's own interpreter and stdlib (the ones a Debian
host would have). Byte-compiling them in the guest at every boot would cost seconds of TCG
time, so the host compiles them once, with a python3.11 of its own when it has one (the same
bytecode). The .pyc files are unchecked-hash ones: the cpio gives every file mtime 0, which
would make timestamp-checked ones stale.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from .rootfs import RootBuilder
from .run import log, run

GUEST_SITE_PACKAGES = "usr/lib/python3/dist-packages"
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


def install_python(rb: RootBuilder) -> None:
    """python3.11 with the libraries it and its extension modules need, the trimmed stdlib,
    and an empty site-packages for the layers."""
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


def _python311() -> str | None:
    """A host python3.11 to precompile with (same bytecode as the guest's Debian 3.11)."""
    for candidate in ("/usr/bin/python3.11", shutil.which("python3.11"), sys.executable):
        if not candidate or not os.path.exists(candidate):
            continue
        version = run([candidate, "-c", "import sys; print(sys.version_info[:2])"], check=False)
        if version.stdout.strip() == "(3, 11)":
            return candidate
    return None


def compile_tree(root: Path, rel: str) -> bool:
    """Byte-compile root/rel as the guest will import it (paths relative to root as /)."""
    python = _python311()
    if python is None:
        log("no host python3.11: guest Python will compile on import (slower)")
        return False
    run(
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
