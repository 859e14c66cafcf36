"""A test-only NBD server for one connection on stdin/stdout, serving a file: what QEMU's
user network starts for each guest connection to a `guestfwd=tcp:ADDR:PORT-cmd:...` rule.

    python3 tests/vm/nbd_server.py DISK LOG

Nothing listens on the host: QEMU (libslirp) runs the command when the guest connects and
hands it the connection as stdin and stdout. It speaks the NBD protocol's fixed newstyle
handshake (NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT; any
export name is this file), then simple replies to READ, WRITE (FUA honoured), FLUSH and DISC:
what Debian 12's nbd-client negotiates and the 6.1 kernel's nbd driver sends (it does the
transmission phase only, with simple replies; TRIM is not offered, so it never sends one).

Writes go straight to the file (os.pwrite, no buffer of ours): what the guest wrote is in the
file as soon as it was acknowledged, even if the guest then vanishes without a DISC (a kexec).
LOG gets one line per option and per non-read command, and stderr (which libslirp may point at
the connection) goes there too, so nothing but protocol ever reaches the guest.
"""

from __future__ import annotations

import os
import struct
import sys
from typing import IO

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
CLIENT_NO_ZEROES = 1 << 1  # client flags

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0

# Transmission flags: the kernel sends FLUSH and FUA writes only when these are offered.
HAS_FLAGS, SEND_FLUSH, SEND_FUA = 1 << 0, 1 << 2, 1 << 3
TRANSMISSION_FLAGS = HAS_FLAGS | SEND_FLUSH | SEND_FUA
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_FLAG_FUA = 1 << 0
EINVAL = 22
COMMAND_NAMES = {CMD_WRITE: "WRITE", CMD_FLUSH: "FLUSH"}


class Disconnected(Exception):
    """The client went away (end of stream), or said goodbye."""


class Connection:
    """The byte stream to the client: stdin to read, stdout to write (unbuffered fds)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd

    def read(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self.read_fd, size - len(data))
            if not chunk:
                raise Disconnected("end of stream")
            data += chunk
        return bytes(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view) :]

    def option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self.write(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, reply, len(data)) + data)


def handshake(conn: Connection, size: int, log: IO[str]) -> None:
    """Fixed newstyle negotiation, up to the start of transmission (NBD_OPT_GO or
    NBD_OPT_EXPORT_NAME); Disconnected on NBD_OPT_ABORT."""
    conn.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", conn.read(4))
    log.write(f"client-flags {client_flags:#x}\n")
    while True:
        magic, option, length = struct.unpack(">QII", conn.read(16))
        if magic != IHAVEOPT:
            raise Disconnected(f"bad option magic {magic:#x}")
        conn.read(length)  # the export name and info requests: there is one export
        log.write(f"option {option}\n")
        if option == OPT_EXPORT_NAME:
            reply = struct.pack(">QH", size, TRANSMISSION_FLAGS)
            if not client_flags & CLIENT_NO_ZEROES:
                reply += bytes(124)
            conn.write(reply)
            return
        if option in (OPT_INFO, OPT_GO):
            export = struct.pack(">HQH", INFO_EXPORT, size, TRANSMISSION_FLAGS)
            conn.option_reply(option, REP_INFO, export)
            conn.option_reply(option, REP_ACK)
            if option == OPT_GO:
                return
        elif option == OPT_LIST:
            name = b""  # the default export: the only one
            conn.option_reply(option, REP_SERVER, struct.pack(">I", len(name)) + name)
            conn.option_reply(option, REP_ACK)
        elif option == OPT_ABORT:
            conn.option_reply(option, REP_ACK)
            raise Disconnected("NBD_OPT_ABORT")
        else:
            conn.option_reply(option, REP_ERR_UNSUP)


def transmission(conn: Connection, disk: int, size: int, log: IO[str]) -> None:
    """Requests until NBD_CMD_DISC (or the end of the stream)."""
    while True:
        magic, flags, kind, handle, offset, length = struct.unpack(">IHHQQI", conn.read(28))
        if magic != REQUEST_MAGIC:
            raise Disconnected(f"bad request magic {magic:#x}")
        if kind == CMD_DISC:
            log.write("DISC\n")
            raise Disconnected("NBD_CMD_DISC")
        payload = conn.read(length) if kind == CMD_WRITE else b""
        error = 0
        if kind in (CMD_READ, CMD_WRITE) and offset + length > size:
            error = EINVAL
        elif kind == CMD_WRITE:
            os.pwrite(disk, payload, offset)
            if flags & CMD_FLAG_FUA:
                os.fsync(disk)
        elif kind == CMD_FLUSH:
            os.fsync(disk)
        elif kind != CMD_READ:
            error = EINVAL
        if kind != CMD_READ:
            name = COMMAND_NAMES.get(kind, str(kind))
            log.write(f"{name} offset={offset} length={length} flags={flags:#x} error={error}\n")
            log.flush()
        reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)
        if kind == CMD_READ and not error:
            reply += os.pread(disk, length, offset)
        conn.write(reply)


def serve(conn: Connection, path: str, log: IO[str]) -> None:
    disk = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(disk).st_size
        log.write(f"connected size={size}\n")
        log.flush()
        handshake(conn, size, log)
        log.write("transmission\n")
        log.flush()
        transmission(conn, disk, size, log)
    except Disconnected as why:
        log.write(f"closed: {why}\n")
    finally:
        os.close(disk)
        log.flush()


def main(argv: list[str]) -> int:
    disk, log_path = argv
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (stderr points at it until exit)
    os.dup2(log.fileno(), 2)  # a traceback must not reach the guest as protocol bytes
    serve(Connection(0, 1), disk, log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
