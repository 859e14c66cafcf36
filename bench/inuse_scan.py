"""How long finding the devices in use takes on a host with many processes.

Builds a fake /proc (N processes, FDS open files each: pipes, sockets, /dev/null, ttys, and one
process holding a GPU) and a sysfs with 64 device nodes below PCI functions, then times
petitkexec.inuse.functions_in_use. Prints medians and the growth ratio measured in one run:
    python bench/inuse_scan.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from petitkexec.inuse import functions_in_use

FDS = 20
NODES = 64
COMMON_TARGETS = ("/dev/null", "pipe:[1234]", "socket:[5678]", "/dev/pts/0", "/var/log/x")


def build(root: Path, processes: int) -> tuple[Path, Path]:
    sysfs, proc = root / "sys", root / "proc"
    for index in range(NODES):
        device = sysfs / "devices" / "pci0000:00" / f"0000:{index // 32 + 1:02x}:{index % 32:02x}.0"
        node = device / "nvme" / f"nvme{index}"
        node.mkdir(parents=True)
        (node / "uevent").write_text(f"MAJOR=240\nDEVNAME=nvme{index}\n")
        links = sysfs / "dev" / "char"
        links.mkdir(parents=True, exist_ok=True)
        (links / f"240:{index}").symlink_to(node)
    for pid in range(1, processes + 1):
        fd_dir = proc / str(pid) / "fd"
        fd_dir.mkdir(parents=True)
        (proc / str(pid) / "comm").write_text("worker\n")
        for fd in range(FDS):
            os.symlink(COMMON_TARGETS[fd % len(COMMON_TARGETS)], fd_dir / str(fd))
    os.symlink("/dev/nvme7", proc / "1" / "fd" / "99")  # the one in use
    return sysfs, proc


def median_seconds(sysfs: Path, proc: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        uses = functions_in_use(sysfs, proc)
        times.append(time.perf_counter() - began)
        assert [use.node for use in uses] == ["/dev/nvme7"]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    results = {}
    for processes in (1_000, 10_000):
        with tempfile.TemporaryDirectory() as directory:
            sysfs, proc = build(Path(directory), processes)
            results[processes] = median_seconds(sysfs, proc, repeat)
        print(
            f"{processes:>6} processes x {FDS} open files: "
            f"{results[processes] * 1000:8.1f} ms (median of {repeat})"
        )
    print(f"growth 1k -> 10k: {results[10_000] / results[1_000]:.1f}x")


if __name__ == "__main__":
    main()
