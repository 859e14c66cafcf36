"""Build or refresh the q35 lane's guest images in .cache/vm/.

    python -m tests.vm.images [--force] [--no-project] [--json]

The PowerNV lane's images have their own command: ``python -m tests.vm.powernv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python tests/vm/images
    sys.path[0] = str(Path(__file__).resolve().parents[3])
    __package__ = "tests.vm.images"

from .build import build_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.vm.images", description=__doc__.split("\n\n")[0]
    )
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
