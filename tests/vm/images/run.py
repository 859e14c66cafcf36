"""The one way the image build runs a child process (and says what it did).

Every tool the build needs (apt-get, dpkg-deb, depmod, readelf, ldconfig, pip, mke2fs) is run
through `run()`: its failure, or its absence, becomes an `ImageError` that names the command
and shows what it printed, instead of a traceback from deep inside subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


class ImageError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[vm-image] {message}", file=sys.stderr, flush=True)


def run(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `args` (no stdin, output captured as text); with check, a non-zero exit raises."""
    try:
        proc = subprocess.run(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise ImageError(f"{args[0]} not found: see .ci/apt-packages") from None
    if check and proc.returncode != 0:
        raise ImageError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
