"""Mount tables: one line of mountinfo(5) as a frozen `Mount`, and the table of one process's
mount namespace (/proc/self/mountinfo, or /proc/PID/mountinfo for another namespace)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# File systems whose data travels over a network interface. Not every fuse.* does (lxcfs,
# gvfsd-fuse, portals): only the ones known to.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "ceph",
        "glusterfs",
        "afs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.ceph-fuse",
        "fuse.s3fs",
        "fuse.rclone",
    }
)


@dataclass(frozen=True)
class Mount:
    """One mounted file system, from a mountinfo file."""

    device: tuple[int, int]  # st_dev of the file system: (major, minor)
    mount_point: str
    fstype: str
    source: str
    writable: bool
    # The file system's own options (the last field), unescaped: overlay's upperdir= and
    # lowerdir= name the directories it writes to and reads from.
    super_options: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, line: str) -> Mount:
        """One line of mountinfo(5); ValueError if it is not one."""
        # ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        before, separator, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not separator or len(fields) < 6 or not tail or fields[2].count(":") != 1:
            raise ValueError(f"not a mountinfo line: {line!r}")
        major, minor = fields[2].split(":")
        options = fields[5].split(",")
        super_options = tail[2].split(",") if len(tail) > 2 else []
        return cls(
            device=(int(major), int(minor)),
            mount_point=unescape(fields[4]),
            fstype=tail[0],
            source=unescape(tail[1]) if len(tail) > 1 else "",
            writable="rw" in options and "ro" not in super_options,
            super_options=tuple(super_options),
        )

    def option(self, key: str) -> list[str]:
        """Every value of one super option (`lowerdir+=` may repeat), unescaped."""
        prefix = key + "="
        return [unescape(o[len(prefix) :]) for o in self.super_options if o.startswith(prefix)]


def unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (and a super option's
    comma, seq_show_option())."""
    if "\\" not in text:
        return text  # the usual case: no substitution to run for every field of every line
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), text)


def overlay_directories(value: str) -> list[str]:
    """lowerdir=A:B:C; a colon inside a path is escaped as `\\:`
    (ovl_parse_param_split_lowerdirs())."""
    return [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", value) if part]


def mount_holding(mounts: Sequence[Mount], path: str) -> Mount | None:
    """The mount a path lies on, by the longest mount point that is a prefix of it (the
    last one mounted wins among equals), without asking any file system."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") + "/"
        if (path + "/").startswith(point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def read_mountinfo(mountinfo: Path) -> list[Mount]:
    """Every line of one mountinfo file; OSError if unreadable, ValueError if a line is not
    a mountinfo line."""
    text = mountinfo.read_text()
    return [Mount.parse(line) for line in text.splitlines() if line.strip()]
