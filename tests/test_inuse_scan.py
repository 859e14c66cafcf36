"""The busy scan over /proc/PID/fd: exactly the open files whose path is wanted, on fake /proc
trees drawn at random (processes that exited, entries that are not processes, fds on device
nodes, pipes, sockets and files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from petitkexec.inuse import open_nodes

WANTED = ("/dev/nvidia0", "/dev/nvme0n1", "/dev/vfio/7", "/dev/liveupdate")
OTHER = (
    "/dev/null",
    "pipe:[4026]",
    "socket:[88]",
    "/dev/pts/0",
    "/var/log/x",
    "anon_inode:[eventfd]",
)

# pid → its open files (fd → path), or None for a process that exited after /proc was listed
# (its directory is there, its fd directory is gone).
processes = st.dictionaries(
    st.integers(1, 4_000_000),
    st.none() | st.dictionaries(st.integers(0, 1023), st.sampled_from(WANTED + OTHER), max_size=8),
    max_size=12,
)


def fake_proc(root: Path, table: dict[int, dict[int, str] | None]) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)  # not a process: skipped
    (proc / "sys").mkdir()
    for pid, files in table.items():
        (proc / str(pid)).mkdir()
        if files is None:
            continue
        (proc / str(pid) / "fd").mkdir()
        for fd, target in files.items():
            os.symlink(target, proc / str(pid) / "fd" / str(fd))
    return proc


@settings(max_examples=60, deadline=None)
@given(table=processes, wanted=st.sets(st.sampled_from(WANTED + OTHER[:1])))
def test_the_scan_yields_exactly_the_open_files_whose_path_is_wanted(
    table: dict[int, dict[int, str] | None], wanted: set[str]
) -> None:
    expected = sorted(
        (target, pid, fd)
        for pid, files in table.items()
        for fd, target in (files or {}).items()
        if target in wanted
    )
    with tempfile.TemporaryDirectory() as scratch:
        proc = fake_proc(Path(scratch), table)
        assert sorted(open_nodes(proc, wanted)) == expected


def test_a_missing_proc_yields_nothing(tmp_path: Path) -> None:
    assert list(open_nodes(tmp_path / "proc", set(WANTED))) == []
