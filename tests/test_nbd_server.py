"""The guest lane's NBD server (tests/vm/nbd_server.py), spoken to over a socket pair the way
nbd-client and the kernel's nbd driver speak to it: handshake, then transmission."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import nbd_server as nbd

SIZE = 1 << 20


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "server closed the connection"
            data += chunk
        return data

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = struct.unpack(">QIII", self.read(20))
        assert magic == nbd.OPTION_REPLY_MAGIC
        return option, reply, self.read(length)

    def request(
        self, kind: int, offset: int, length: int, data: bytes = b"", flags: int = 0
    ) -> int:
        self.sock.sendall(
            struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, kind, 7, offset, length) + data
        )
        if kind == nbd.CMD_DISC:
            return 0
        magic, error, handle = struct.unpack(">IIQ", self.read(16))
        assert (magic, handle) == (nbd.SIMPLE_REPLY_MAGIC, 7)
        return int(error)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, Path, io.StringIO]]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(SIZE))
    ours, theirs = socket.socketpair()
    log = io.StringIO()
    conn = nbd.Connection(theirs.fileno(), theirs.fileno())
    server = threading.Thread(target=nbd.serve, args=(conn, str(disk), log), daemon=True)
    server.start()
    yield Client(ours), disk, log
    ours.close()
    server.join(timeout=5)
    assert not server.is_alive()
    theirs.close()


def test_go_then_write_read_flush_and_disconnect(
    served: tuple[Client, Path, io.StringIO],
) -> None:
    client, disk, log = served
    magic, opt_magic, flags = struct.unpack(">QQH", client.read(18))
    assert (magic, opt_magic) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    assert flags & nbd.FLAG_FIXED_NEWSTYLE
    client.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.CLIENT_NO_ZEROES))
    client.option(99)  # an option it does not know: refused, negotiation goes on
    assert client.option_reply() == (99, nbd.REP_ERR_UNSUP, b"")
    name = b"disk"
    client.option(nbd.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    option, reply, info = client.option_reply()
    assert (option, reply) == (nbd.OPT_GO, nbd.REP_INFO)
    assert struct.unpack(">HQH", info) == (nbd.INFO_EXPORT, SIZE, nbd.TRANSMISSION_FLAGS)
    assert client.option_reply() == (nbd.OPT_GO, nbd.REP_ACK, b"")

    assert client.request(nbd.CMD_WRITE, 4096, 5, b"hello", flags=nbd.CMD_FLAG_FUA) == 0
    assert disk.read_bytes()[4096:4101] == b"hello"  # in the file once acknowledged
    assert client.request(nbd.CMD_READ, 4094, 8) == 0
    assert client.read(8) == b"\0\0hello\0"
    assert client.request(nbd.CMD_FLUSH, 0, 0) == 0
    assert client.request(nbd.CMD_READ, SIZE - 1, 2) == nbd.EINVAL  # past the end
    client.request(nbd.CMD_DISC, 0, 0)
    deadline = time.monotonic() + 10
    while "closed:" not in log.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "WRITE offset=4096 length=5 flags=0x1 error=0" in log.getvalue()
    assert log.getvalue().rstrip().endswith("closed: NBD_CMD_DISC")


def test_export_name_without_no_zeroes_gets_the_padding(
    served: tuple[Client, Path, io.StringIO],
) -> None:
    client, _disk, _log = served
    client.read(18)
    client.sock.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE))
    client.option(nbd.OPT_EXPORT_NAME, b"")
    size, flags = struct.unpack(">QH", client.read(10))
    assert (size, flags) == (SIZE, nbd.TRANSMISSION_FLAGS)
    assert client.read(124) == bytes(124)
    client.request(nbd.CMD_DISC, 0, 0)
