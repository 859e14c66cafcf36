"""How long finding the devices in use takes on a host with many processes.

Builds a fake /proc (N processes, FDS open files each: pipes, sockets, /dev/null, ttys, and one
process holding an NVMe controller; each with its mount namespace link, one in 50 in a
container's) and a sysfs with 64 device nodes below PCI functions, then
times petitkexec.inuse.scan_busy and, in turn with it, the scan it replaced (one
readlink by full path per fd, Path objects per process). Prints median wall and CPU time
(user + sys of this process: the machine is shared, wall time waits for a core), the ratio
new/old and the growth 1k -> 10k, all measured in one run:
    python bench/inuse_scan.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from petitkexec.inuse import NodeUse, device_nodes, scan_busy
from petitkexec.storage import Storage

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
        (proc / str(pid) / "ns").mkdir()
        namespace = 4026531841 if pid % 50 else 4026532000 + pid
        os.symlink(f"mnt:[{namespace}]", proc / str(pid) / "ns" / "mnt")
        for fd in range(FDS):
            os.symlink(COMMON_TARGETS[fd % len(COMMON_TARGETS)], fd_dir / str(fd))
    os.symlink("/dev/nvme7", proc / "1" / "fd" / "99")  # the one in use
    return sysfs, proc


def previous_scan(sysfs: Path, proc: Path) -> list[str]:
    """The scan before readlinkat(): the baseline, the nodes it finds (no fdinfo: none is a
    block device here)."""
    wanted, found = set(device_nodes(sysfs, proc, Storage(sysfs, proc))), []
    for process in os.scandir(proc):
        if process.name.isdigit():
            for fd in os.scandir(Path(process.path) / "fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target in wanted:
                    found.append(target)
    return found


def current_scan(sysfs: Path, proc: Path) -> list[str]:
    uses: list[NodeUse] = scan_busy(sysfs, proc, Storage(sysfs, proc)).in_use
    return [use.node for use in uses]


SCANS = {"scan_busy": current_scan, "previous scan": previous_scan}


def medians(sysfs: Path, proc: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """(wall, cpu) medians of each scan, run in turn so that load falls on both alike."""
    walls: dict[str, list[float]] = {name: [] for name in SCANS}
    cpus: dict[str, list[float]] = {name: [] for name in SCANS}
    for _ in range(repeat):
        for name, scan in SCANS.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            found = scan(sysfs, proc)
            cpus[name].append(time.process_time() - began_cpu)
            walls[name].append(time.perf_counter() - began)
            assert found == ["/dev/nvme7"], (name, found)
    return {n: (statistics.median(walls[n]), statistics.median(cpus[n])) for n in SCANS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    results = {}
    for processes in (1_000, 10_000):
        with tempfile.TemporaryDirectory() as directory:
            sysfs, proc = build(Path(directory), processes)
            results[processes] = medians(sysfs, proc, repeat)
        new, old = results[processes]["scan_busy"], results[processes]["previous scan"]
        print(f"{processes:>6} processes x {FDS} open files (median of {repeat}):")
        for name, (wall, cpu) in results[processes].items():
            print(f"  {name:<18} wall {wall * 1000:8.1f} ms   cpu {cpu * 1000:8.1f} ms")
        print(f"  new / previous     wall {new[0] / old[0]:8.2f}x     cpu {new[1] / old[1]:8.2f}x")
    for name in SCANS:
        small, large = results[1_000][name], results[10_000][name]
        wall, cpu = large[0] / small[0], large[1] / small[1]
        print(f"growth 1k -> 10k, {name}: wall {wall:.1f}x, cpu {cpu:.1f}x")


if __name__ == "__main__":
    main()
