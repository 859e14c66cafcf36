"""Which sockets some process holds: every socket inode an fd of any process links to.

A socket no process holds is held by the kernel alone. nbd in netlink mode is one:
nbd_genl_connect() takes the client's socket with sockfd_lookup() (nbd_add_socket() keeps
its file), the client exits, and from then on only the kernel's recv_work() reads it. NFS,
CIFS and iSCSI make theirs with sock_create_kern(): held by the kernel too. /proc/net/tcp
still lists such a connection, with an inode no `socket:[INODE]` link names.
"""

from __future__ import annotations

import os
from pathlib import Path


def held_socket_inodes(proc_root: Path) -> frozenset[int]:
    """The inodes of the sockets the fds of every process link to (`socket:[INODE]`). One
    readlink per open file, as inuse.scan_processes() does; no stat (it could hang)."""
    root = os.fspath(proc_root)
    held: set[int] = set()
    for name in _listdir(root):
        if not name.isdigit():
            continue
        try:
            directory = os.open(f"{root}/{name}/fd", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # exited meanwhile
        try:
            for fd in _listdir(directory):
                try:
                    target = os.readlink(fd, dir_fd=directory)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1].isdigit():
                    held.add(int(target[8:-1]))
        finally:
            os.close(directory)
    return frozenset(held)


def _listdir(directory: str | int) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
