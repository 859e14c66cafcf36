"""Which NICs carry a network block device's session: NBD, NVMe over TCP/RDMA, iSCSI, Ceph RBD.

A disk reached over the network resolves to no PCI function of its own: the functions that
carry it are the NICs on the route to its remote address. The address comes from what each
driver exposes in sysfs (and, for NBD, from the socket its client holds); the route from
/proc/net/route and /proc/net/ipv6_route (a firmware image has no `ip` binary), longest prefix
first; the interface then leads through bonds, VLANs, bridges, teams and macvlans (`lower_*`
links, netdev_upper_dev_link()) down to PCI functions. When the session's address cannot be
found, every NIC that is up may carry it: all of them are needed, as for a network file system.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from petitkexec.bdf import Bdf
from petitkexec.blockdev import resolve_link
from petitkexec.kernelsockets import held_socket_inodes

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ByteOrder = Literal["little", "big"]

RTF_UP = 0x0001  # include/uapi/linux/route.h
RTF_REJECT = 0x0200
TCP_ESTABLISHED = "01"  # include/net/tcp_states.h, as tcp4_seq_show() prints it (%02X)


@dataclass(frozen=True)
class Endpoint:
    """The remote end of a session."""

    address: Address
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return str(self.address)
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @property
    def local(self) -> bool:
        return self.address.is_loopback or self.address.is_unspecified


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Route:
    network: Network
    interface: str
    metric: int


# --- parsers (pure: text in, values out) -----------------------------------------------------


def _ipv4(hex_word: str, byteorder: ByteOrder) -> ipaddress.IPv4Address:
    """An IPv4 address as /proc/net/route and /proc/net/tcp print it: the __be32 printed as a
    native integer (%08X), so its digits are reversed on a little-endian CPU only."""
    if len(hex_word) != 8:
        raise ValueError(f"not an IPv4 word: {hex_word!r}")
    return ipaddress.IPv4Address(int(hex_word, 16).to_bytes(4, byteorder))


def parse_ipv4_routes(text: str, byteorder: ByteOrder = sys.byteorder) -> list[Route]:
    """/proc/net/route (fib_route_seq_show(): the main table): Iface Destination Gateway Flags
    RefCnt Use Metric Mask ...; lines that do not parse, or routes down or rejecting, are left
    out."""
    routes = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        try:
            flags = int(fields[3], 16)
            if not flags & RTF_UP or flags & RTF_REJECT:
                continue
            destination, mask = _ipv4(fields[1], byteorder), _ipv4(fields[7], byteorder)
            network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
            routes.append(Route(network, fields[0], int(fields[6])))
        except (IndexError, ValueError):
            continue
    return routes


def parse_ipv6_routes(text: str) -> list[Route]:
    """/proc/net/ipv6_route (ipv6_route_native_seq_show(), every table, the local one too):
    destination (32 hex digits, network order), its prefix length, source, its prefix length,
    next hop, metric, refcount, use, flags (8 hex digits each), device."""
    routes = []
    for line in text.splitlines():
        fields = line.split()
        try:
            if len(fields) != 10 or len(fields[0]) != 32:
                continue
            flags = int(fields[8], 16)
            if not flags & RTF_UP or flags & RTF_REJECT:
                continue
            destination = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            network = ipaddress.IPv6Network(f"{destination}/{int(fields[1], 16)}", strict=False)
            routes.append(Route(network, fields[9], int(fields[5], 16)))
        except ValueError:
            continue
    return routes


def parse_tcp_sockets(
    text: str, byteorder: ByteOrder = sys.byteorder, established_only: bool = False
) -> dict[int, tuple[Endpoint, Endpoint]]:
    """/proc/net/tcp or tcp6 (tcp4_seq_show(), tcp6_seq_show()): socket inode → (local,
    remote). Addresses are __be32 words printed as native integers (%08X, four of them for
    IPv6), ports in host order (%04X); `st` is the TCP state in hex (01: ESTABLISHED)."""
    sockets = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        try:
            if established_only and fields[3] != TCP_ESTABLISHED:
                continue
            local, remote = _tcp_endpoint(fields[1], byteorder), _tcp_endpoint(fields[2], byteorder)
            sockets[int(fields[9])] = (local, remote)
        except (IndexError, ValueError):
            continue
    return sockets


def _tcp_endpoint(text: str, byteorder: ByteOrder) -> Endpoint:
    address, _, port = text.partition(":")
    if len(address) == 8:
        return Endpoint(_ipv4(address, byteorder), int(port, 16))
    if len(address) == 32:
        words = [int(address[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, 32, 8)]
        return Endpoint(ipaddress.IPv6Address(b"".join(words)), int(port, 16))
    raise ValueError(f"not a socket address: {text!r}")


def parse_nvme_address(text: str) -> dict[str, str]:
    """An NVMe over Fabrics controller's `address` (nvmf_get_address(); nvme-tcp appends
    src_addr=): `traddr=10.0.0.1,trsvcid=4420,host_iface=eth1,src_addr=10.0.0.2`."""
    pairs = {}
    for item in text.strip().split(","):
        key, separator, value = item.partition("=")
        if separator and key.strip():
            pairs[key.strip()] = value.strip()
    return pairs


def parse_endpoint(address: str, port: str | None = None) -> Endpoint | None:
    """An address as sysfs shows one (`10.0.2.100`, `fe80::1%eth0`), or None."""
    try:
        parsed: Address = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
        number = int(port) if port is not None and port.strip().isdigit() else None
    except ValueError:
        return None
    return Endpoint(parsed, number)


def route_interface(routes: list[Route], address: Address) -> str | None:
    """The interface of the longest matching prefix (lowest metric among equals)."""
    best: Route | None = None
    for route in routes:
        if route.network.version != address.version or address not in route.network:
            continue
        if best is None or (route.network.prefixlen, -route.metric) > (
            best.network.prefixlen,
            -best.metric,
        ):
            best = route
    return best.interface if best is not None else None


# --- the machine: sessions, routes and interfaces ---------------------------------------------


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class NetworkView:
    """The roots network storage is found under, and how to read this CPU's /proc words."""

    sysfs_root: Path
    proc_root: Path
    byteorder: ByteOrder = sys.byteorder
    # The socket inodes some process holds, walked for at most once (a walk over every
    # process's fds: ~0.5 s at 10,000 processes, bench/inuse_scan.py's tree).
    _held_sockets: list[frozenset[int]] = field(default_factory=list, repr=False)

    def carriers(self, leaf: Path) -> list[tuple[Bdf, str]] | None:
        """(NIC, reason) for a block device's leaf that is a network session; None when the
        leaf is no network block device."""
        name = leaf.name
        if re.fullmatch(r"nbd\d+", name):
            return self._nbd(leaf)
        if re.fullmatch(r"rbd\d+", name):
            # Ceph talks to every OSD and monitor of the cluster, at addresses sysfs does
            # not list (/sys/bus/rbd/devices/N/ has client_addr, ours, only).
            return self._every_nic(f"may carry {name} (Ceph RBD: its OSDs are not listed)")
        controller = _nvme_fabrics_controller(leaf) if name.startswith("nvme") else None
        if controller is not None:
            return self._nvme(controller)
        session = _iscsi_session(leaf) if "/session" in str(leaf) else None
        if session is not None:
            return self._iscsi(leaf, session)
        return None

    def _nbd(self, leaf: Path) -> list[tuple[Bdf, str]]:
        """block/nbdN/pid in sysfs exists while the device is connected (nbd_start_device()); in
        ioctl mode (busybox and nbd-client without -N netlink) that process sits in
        NBD_DO_IT holding the socket. `backend` (netlink only) is a free-form identifier, not
        an address."""
        try:
            pid = int((leaf / "pid").read_text())
        except (OSError, ValueError):
            return []  # not connected: nothing travels over a network
        sessions = self._sockets_of(pid)
        if sessions:
            return self._to_endpoints(leaf.name, sessions)
        # Netlink mode: the client exited, `pid` names it (nbd_start_device() records who
        # connected; the kernel's recv_work() holds the socket). Which kernel-held connection
        # is this device's is not shown anywhere, nor is its port fixed (10809 is only the
        # default): every kernel-held connection may be one of its num_connections, and each
        # one's NIC is needed. One too many (an NFS or iSCSI session's, needed anyway) is safe.
        # A Unix socket only ([]) is a local server, or the exited client's pid reused by
        # another process: the kernel-held connections are looked at in both cases.
        kernel_held = self._kernel_held_connections()
        if not kernel_held:
            if sessions == []:
                return []  # a local server: nothing travels over a NIC
            return self._every_nic(f"may carry {leaf.name} (its socket is not visible)")
        return [
            (bdf, f"{reason} (a connection the kernel holds)")
            for bdf, reason in self._to_endpoints(leaf.name, kernel_held)
        ]

    def _kernel_held_connections(self) -> list[tuple[Endpoint, Endpoint]]:
        """ESTABLISHED TCP connections whose socket no process holds, in the network
        namespace of pid 1 (/proc/1/net/: /proc/net/ is the reader's own, and the root's is
        where nbd-client ran on a host)."""
        found: list[tuple[Endpoint, Endpoint]] = []
        held: frozenset[int] | None = None
        for table in ("tcp", "tcp6"):
            try:
                text = (self.proc_root / "1" / "net" / table).read_text()
            except OSError:
                continue
            # Inode 0: a connection not accepted yet (no struct socket), never nbd's.
            sockets = parse_tcp_sockets(text, self.byteorder, established_only=True)
            sockets.pop(0, None)
            if sockets and held is None:
                held = self._held_socket_inodes()
            found.extend(ends for inode, ends in sockets.items() if inode not in (held or ()))
        return found

    def _held_socket_inodes(self) -> frozenset[int]:
        if not self._held_sockets:
            self._held_sockets.append(held_socket_inodes(self.proc_root))
        return self._held_sockets[0]

    def _sockets_of(self, pid: int) -> list[tuple[Endpoint, Endpoint]] | None:
        """(local, remote) of each TCP socket a process holds, read in its own network
        namespace (/proc/PID/net/); [] when it holds a Unix socket only; None when nothing
        tells."""
        directory = self.proc_root / str(pid)
        inodes = set()
        for fd in _listdir(directory / "fd"):
            try:
                target = os.readlink(directory / "fd" / fd)
            except OSError:
                continue
            if match := re.fullmatch(r"socket:\[(\d+)\]", target):
                inodes.add(int(match[1]))
        found: list[tuple[Endpoint, Endpoint]] = []
        for table in ("tcp", "tcp6"):
            try:
                text = (directory / "net" / table).read_text()
            except OSError:
                continue
            sockets = parse_tcp_sockets(text, self.byteorder)
            found.extend(sockets[inode] for inode in inodes if inode in sockets)
        if found:
            return found
        return [] if inodes and self._unix_socket(directory, inodes) else None

    @staticmethod
    def _unix_socket(directory: Path, inodes: set[int]) -> bool:
        try:
            lines = (directory / "net" / "unix").read_text().splitlines()[1:]
        except OSError:
            return False
        # Num RefCount Protocol Flags Type St Inode Path (unix_seq_show())
        held = {int(f[6]) for line in lines if len(f := line.split()) > 6 and f[6].isdigit()}
        return not held.isdisjoint(inodes)

    def _nvme(self, controller: Path) -> list[tuple[Bdf, str]]:
        try:
            transport = (controller / "transport").read_text().strip()
            address = parse_nvme_address((controller / "address").read_text())
        except OSError:
            return []
        name = controller.name
        if transport == "loop":
            return []  # an NVMe target on this machine
        if transport not in ("tcp", "rdma"):
            return self._every_nic(f"may carry {name} ({transport}: {address.get('traddr', '?')})")
        remote = parse_endpoint(address.get("traddr", ""), address.get("trsvcid"))
        if remote is None:
            return self._every_nic(f"may carry {name} (nvme over {transport})")
        interface = address.get("host_iface")  # the connection is bound to it (SO_BINDTODEVICE)
        reason = f"carries {name} → {remote}"
        if interface:
            return [(bdf, reason) for bdf in self.functions_of_interface(interface)]
        return self._to_endpoints(name, [(None, remote)])

    def _iscsi(self, leaf: Path, session: Path) -> list[tuple[Bdf, str]]:
        """A software iSCSI (iscsi_tcp) disk: its session's connections,
        connectionS:C/iscsi_connection/connectionS:C/{address,port} (the current one) or
        persistent_address and persistent_port (the one configured)."""
        endpoints: list[tuple[Endpoint | None, Endpoint]] = []
        for connection in _listdir(session):
            if not connection.startswith("connection"):
                continue
            attributes = session / connection / "iscsi_connection" / connection
            for address, port in (("address", "port"), ("persistent_address", "persistent_port")):
                try:
                    endpoint = parse_endpoint(
                        (attributes / address).read_text(), (attributes / port).read_text()
                    )
                except OSError:
                    continue
                if endpoint is not None:
                    endpoints.append((None, endpoint))
                    break
        if not endpoints:
            return self._every_nic(f"may carry {leaf.name} (iSCSI {session.name})")
        return self._to_endpoints(f"{leaf.name} ({session.name})", endpoints)

    def _to_endpoints(
        self, name: str, sessions: Sequence[tuple[Endpoint | None, Endpoint]]
    ) -> list[tuple[Bdf, str]]:
        """(local, remote) of each connection → the NICs on the route to the remote end."""
        carriers = []
        for local, remote in sessions:
            if remote.local or (local is not None and remote.address == local.address):
                continue  # a server on this machine: no NIC on the way
            interface = self.interface_towards(remote.address)
            reason = f"carries {name} → {remote}"
            if interface is None:
                carriers.extend(self._every_nic(f"may carry {name} → {remote} (no route)"))
                continue
            functions = self.functions_of_interface(interface)
            if not functions and interface != "lo":
                # A tunnel (WireGuard, GRE, VXLAN) has no lower links: its packets leave
                # through whichever NIC routes to its own endpoint.
                how = f"may carry {name} → {remote} (through {interface})"
                carriers.extend(self._every_nic(how))
                continue
            carriers.extend((bdf, reason) for bdf in functions)
        return carriers

    def interface_towards(self, address: Address) -> str | None:
        if address.version == 4:
            return route_interface(self._routes("route", 4), address)
        return route_interface(self._routes("ipv6_route", 6), address)

    def _routes(self, name: str, version: int) -> list[Route]:
        try:
            text = (self.proc_root / "net" / name).read_text()
        except OSError:
            return []
        return parse_ipv4_routes(text, self.byteorder) if version == 4 else parse_ipv6_routes(text)

    def functions_of_interface(self, interface: str) -> set[Bdf]:
        """The PCI functions below a network interface: its `device`, or through its
        `lower_*` links (bond, VLAN, bridge, team, macvlan) theirs."""
        net = self.sysfs_root / "class" / "net"
        found: set[Bdf] = set()
        pending, seen = [interface], set()
        while pending:
            name = pending.pop()
            if name in seen or "/" in name or name in ("", ".", ".."):
                continue
            seen.add(name)
            bdf = _function_of_interface(net / name)
            if bdf is not None:
                found.add(bdf)
                continue
            pending.extend(
                entry.removeprefix("lower_")
                for entry in _listdir(net / name)
                if entry.startswith("lower_")
            )
        return found

    def _every_nic(self, reason: str) -> list[tuple[Bdf, str]]:
        return [(bdf, reason) for bdf, _interface in active_network_functions(self.sysfs_root)]


def active_network_functions(sysfs_root: Path) -> Iterator[tuple[Bdf, str]]:
    """PCI network functions with an interface that is up (or whose driver does not say)."""
    net = sysfs_root / "class" / "net"
    for interface in _listdir(net):
        try:
            if (net / interface / "operstate").read_text().strip() not in ("up", "unknown"):
                continue
        except OSError:
            continue
        if bdf := _function_of_interface(net / interface):
            yield bdf, interface


def _function_of_interface(link: Path) -> Bdf | None:
    """class/net/IF in sysfs is a link itself: resolve it before its `device` link."""
    try:
        return Bdf.innermost_in(resolve_link(Path(resolve_link(link)) / "device"))
    except OSError:
        return None


def _nvme_fabrics_controller(leaf: Path) -> Path | None:
    """The controller of an NVMe over Fabrics namespace (…/nvme-fabrics/ctl/nvmeN/nvmeNn1 or
    …/nvmeNcCnM), or the controller itself (a multipath head's subsystem links to it)."""
    for candidate in (leaf, leaf.parent):
        if (candidate / "transport").exists():
            return candidate
    return None


def _iscsi_session(leaf: Path) -> Path | None:
    """The sessionN directory a software iSCSI disk lies below
    (…/platform/hostH/sessionN/targetH:0:0/H:0:0:L/block/sdX)."""
    for ancestor in leaf.parents:
        if re.fullmatch(r"session\d+", ancestor.name):
            return ancestor
    return None


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []
