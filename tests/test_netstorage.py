"""Network block storage: the NICs on the route to each session's remote address are needed,
through bonds and VLANs, on a fake sysfs and /proc laid out as Linux 6.1 lays them out."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import pytest

from petitkexec import netstorage
from petitkexec.netstorage import (
    Endpoint,
    parse_ipv4_routes,
    parse_ipv6_routes,
    parse_nvme_address,
    parse_tcp_sockets,
    route_interface,
)
from tests.test_facts import FakeMachine

VIRTIO_NET = "0000:00:03.0"
PORT_A, PORT_B = "0000:02:00.0", "0000:02:00.1"
ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"
TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode"
)


def word(address: str, byteorder: str = sys.byteorder) -> str:
    """An IPv4 address as /proc prints it on a CPU of this byte order."""
    packed = ipaddress.ip_address(address).packed
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], byteorder):08X}"  # type: ignore[arg-type]
        for i in range(0, len(packed), 4)
    )


class NetMachine(FakeMachine):
    """FakeMachine with NICs, routes and sockets."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.routes: list[str] = [ROUTE_HEADER]

    def nic(self, name: str, bdf: str, state: str = "up") -> None:
        device = self.directory(f"pci0000:00/{bdf}")
        interface = self.directory(f"pci0000:00/{bdf}/net/{name}")
        (interface / "operstate").write_text(state + "\n")
        self.link(interface / "device", device)
        self.link(self.sys / "class" / "net" / name, interface)

    def virtual_nic(self, name: str, lower: list[str]) -> None:
        interface = self.directory(f"virtual/net/{name}")
        (interface / "operstate").write_text("up\n")
        for below in lower:
            self.link(interface / f"lower_{below}", (self.sys / "class" / "net" / below).resolve())
        self.link(self.sys / "class" / "net" / name, interface)

    def route(self, interface: str, network: str, gateway: str = "0.0.0.0") -> None:
        net = ipaddress.ip_network(network)
        flags = 0x0003 if gateway != "0.0.0.0" else 0x0001
        self.routes.append(
            f"{interface}\t{word(str(net.network_address))}\t{word(gateway)}\t{flags:04X}\t0\t0"
            f"\t100\t{word(str(net.netmask))}\t0\t0\t0"
        )
        (self.proc / "net").mkdir(exist_ok=True)
        (self.proc / "net" / "route").write_text("\n".join(self.routes) + "\n")

    def nbd(self, index: int, pid: int | None) -> None:
        nbd = self.block(f"virtual/block/nbd{index}", f"43:{index * 32}")
        (nbd / "uevent").write_text(f"MAJOR=43\nDEVNAME=nbd{index}\n")
        if pid is not None:
            (nbd / "pid").write_text(f"{pid}\n")

    def nbd_client(self, pid: int, local: str, remote: str, inode: int = 5555) -> None:
        """A process holding a TCP socket, as nbd-client (busybox's too) in NBD_DO_IT does."""
        directory = self.proc / str(pid)
        (directory / "fd").mkdir(parents=True)
        (directory / "net").mkdir()
        (directory / "comm").write_text("nbd-client\n")
        os.symlink(f"socket:[{inode}]", directory / "fd" / "3")
        (local_address, local_port), (remote_address, remote_port) = (
            endpoint.rsplit(":", 1) for endpoint in (local, remote)
        )
        (directory / "net" / "tcp").write_text(
            f"{TCP_HEADER}\n   0: {word(local_address)}:{int(local_port):04X} "
            f"{word(remote_address)}:{int(remote_port):04X} 01 00000000:00000000 00:00000000 "
            f"00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
        )


@pytest.fixture
def machine(tmp_path: Path) -> NetMachine:
    net = NetMachine(tmp_path)
    net.nic("eth0", VIRTIO_NET)
    net.route("eth0", "0.0.0.0/0", gateway="10.0.2.2")
    net.route("eth0", "10.0.2.0/24")
    return net


def bonded_vlan(machine: NetMachine) -> None:
    """bond0.100 (a VLAN) on bond0 on eth1 + eth2, routing 10.1.0.0/16."""
    machine.nic("eth1", PORT_A)
    machine.nic("eth2", PORT_B)
    machine.virtual_nic("bond0", ["eth1", "eth2"])
    machine.virtual_nic("bond0.100", ["bond0"])
    machine.route("bond0.100", "10.1.0.0/16")


# --- NBD --------------------------------------------------------------------------------------


def test_an_ext4_on_nbd_needs_the_nic_on_the_route_to_its_server(machine: NetMachine) -> None:
    machine.nbd(0, pid=900)
    machine.nbd_client(900, "10.0.2.15:53000", "10.0.2.100:10809")
    machine.mount("40 29 43:0 / /mnt rw,relatime - ext4 /dev/nbd0 rw")
    assert machine.needed() == {
        VIRTIO_NET: "carries nbd0 → 10.0.2.100:10809, backs /mnt mounted rw"
    }


def test_an_nbd_server_behind_a_bonded_vlan_needs_every_port_of_the_bond(
    machine: NetMachine,
) -> None:
    bonded_vlan(machine)
    machine.nbd(1, pid=901)
    machine.nbd_client(901, "10.1.0.5:53000", "10.1.7.7:10809")
    machine.mount("29 1 43:32 / / rw,relatime - ext4 /dev/nbd1 rw")
    reason = "carries nbd1 → 10.1.7.7:10809, backs / mounted rw"
    assert machine.needed() == {PORT_A: reason, PORT_B: reason}


def test_an_nbd_device_held_open_for_writing_needs_its_nic(machine: NetMachine) -> None:
    machine.nbd(0, pid=900)
    machine.nbd_client(900, "10.0.2.15:53000", "10.0.2.100:10809")
    writer = machine.proc / "77"
    (writer / "fd").mkdir(parents=True)
    (writer / "fdinfo").mkdir()
    (writer / "comm").write_text("dd\n")
    os.symlink("/dev/nbd0", writer / "fd" / "4")
    (writer / "fdinfo" / "4").write_text("pos:\t0\nflags:\t0100001\n")
    assert machine.needed() == {
        VIRTIO_NET: "carries nbd0 → 10.0.2.100:10809, in use: /dev/nbd0 by pid 77 dd"
    }


def test_an_nbd_server_on_this_machine_needs_no_nic(machine: NetMachine) -> None:
    machine.nbd(0, pid=900)
    machine.nbd_client(900, "127.0.0.1:53000", "127.0.0.1:10809")
    machine.mount("40 29 43:0 / /mnt rw,relatime - ext4 /dev/nbd0 rw")
    assert machine.needed() == {}


def test_an_nbd_whose_socket_is_not_visible_needs_every_nic_that_is_up(
    machine: NetMachine,
) -> None:
    machine.nic("eth9", PORT_B, state="down")
    machine.nbd(0, pid=4242)  # netlink mode: the client configured it and exited
    machine.mount("40 29 43:0 / /mnt rw,relatime - ext4 /dev/nbd0 rw")
    assert machine.needed() == {
        VIRTIO_NET: "may carry nbd0 (its socket is not visible), backs /mnt mounted rw"
    }


def tcp_line(local: str, remote: str, inode: int, state: str = "01") -> str:
    """One /proc/net/tcp line (tcp4_seq_show())."""
    (local_address, local_port), (remote_address, remote_port) = (
        endpoint.rsplit(":", 1) for endpoint in (local, remote)
    )
    return (
        f"   0: {word(local_address)}:{int(local_port):04X} "
        f"{word(remote_address)}:{int(remote_port):04X} {state} 00000000:00000000 00:00000000 "
        f"00000000     0        0 {inode} 1 0000000000000000 20 4 30 10 -1"
    )


def netlink_nbd(tmp_path: Path) -> NetMachine:
    """Debian's nbd-client in netlink mode hands its socket to the kernel and exits: pid
    names the gone client, no fd links to the socket, /proc/net/tcp still lists it."""
    machine = NetMachine(tmp_path)
    machine.nic("eth0", VIRTIO_NET)  # up, on another network: not on the session's route
    machine.route("eth0", "192.168.7.0/24")
    machine.nic("eth1", "0000:04:00.0")
    machine.route("eth1", "10.0.2.0/24")
    machine.nbd(0, pid=4242)
    sshd = machine.proc / "1"  # holds its own connection on eth0: not the kernel's
    (sshd / "fd").mkdir(parents=True)
    (sshd / "net").mkdir()
    os.symlink("socket:[8888]", sshd / "fd" / "3")
    (sshd / "net" / "tcp").write_text(
        "\n".join(
            [
                TCP_HEADER,
                tcp_line("10.0.2.15:53000", "10.0.2.100:10809", 7777),
                tcp_line("192.168.7.5:22", "192.168.7.9:40000", 8888),
                tcp_line("192.168.7.5:22", "192.168.7.9:40001", 9999, state="06"),  # TIME_WAIT
            ]
        )
        + "\n"
    )
    machine.mount("40 29 43:0 / /mnt rw,relatime - ext4 /dev/nbd0 rw")
    return machine


def test_a_netlink_nbd_needs_only_the_nic_of_the_connection_the_kernel_holds(
    tmp_path: Path,
) -> None:
    assert netlink_nbd(tmp_path).needed() == {
        "0000:04:00.0": "carries nbd0 → 10.0.2.100:10809 (a connection the kernel holds), "
        "backs /mnt mounted rw"
    }


def test_a_netlink_nbd_whose_pid_was_reused_by_a_unix_socket_holder_keeps_its_nic(
    tmp_path: Path,
) -> None:
    # The client that connected nbd0 exited (netlink mode); its pid now belongs to a process
    # holding only a Unix socket. That is no local NBD session: the kernel-held connection
    # is still this device's, and its NIC still needed.
    machine = netlink_nbd(tmp_path)
    reused = machine.proc / "4242"
    (reused / "fd").mkdir(parents=True)
    (reused / "net").mkdir()
    (reused / "comm").write_text("dbus-daemon\n")
    os.symlink("socket:[6666]", reused / "fd" / "3")
    (reused / "net" / "tcp").write_text(TCP_HEADER + "\n")
    (reused / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 6666 /run/dbus/system_bus_socket\n"
    )
    assert set(machine.needed()) == {"0000:04:00.0"}


def test_the_processes_are_walked_for_their_sockets_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = netlink_nbd(tmp_path)
    machine.nbd(1, pid=4243)  # a second one, a second mount of nbd0, and nbd0 held open:
    machine.mount("41 29 43:32 / /srv rw,relatime - ext4 /dev/nbd1 rw")
    machine.mount("42 29 43:0 / /opt rw,relatime - ext4 /dev/nbd0 rw")
    writer = machine.proc / "77"
    (writer / "fd").mkdir(parents=True)
    (writer / "comm").write_text("dd\n")
    os.symlink("/dev/nbd0", writer / "fd" / "4")
    walks = []
    monkeypatch.setattr(
        netstorage, "held_socket_inodes", lambda proc: walks.append(proc) or frozenset({8888})
    )
    assert set(machine.needed()) == {"0000:04:00.0"}
    assert len(walks) == 1


def test_an_nbd_device_that_is_not_connected_needs_nothing(machine: NetMachine) -> None:
    machine.nbd(3, pid=None)
    machine.mount("40 29 43:96 / /mnt rw,relatime - ext4 /dev/nbd3 rw")
    assert machine.needed() == {}


# --- NVMe over Fabrics, iSCSI, RBD ------------------------------------------------------------


def nvme_over_fabrics(machine: NetMachine, transport: str, address: str) -> None:
    controller = machine.directory("virtual/nvme-fabrics/ctl/nvme1")
    (controller / "transport").write_text(transport + "\n")
    (controller / "address").write_text(address + "\n")
    machine.block("virtual/nvme-fabrics/ctl/nvme1/nvme1n1", "259:5")
    machine.mount("41 29 259:5 / /var/lib/db rw,relatime - xfs /dev/nvme1n1 rw")


def test_nvme_over_tcp_needs_the_nics_on_the_route_to_its_target(machine: NetMachine) -> None:
    bonded_vlan(machine)
    nvme_over_fabrics(machine, "tcp", "traddr=10.1.2.3,trsvcid=4420,src_addr=10.1.0.5")
    reason = "carries nvme1 → 10.1.2.3:4420, backs /var/lib/db mounted rw"
    assert machine.needed() == {PORT_A: reason, PORT_B: reason}


def test_nvme_over_tcp_bound_to_an_interface_needs_that_interface(
    machine: NetMachine,
) -> None:
    bonded_vlan(machine)
    nvme_over_fabrics(machine, "tcp", "traddr=10.0.2.50,trsvcid=4420,host_iface=eth2")
    assert machine.needed() == {
        PORT_B: "carries nvme1 → 10.0.2.50:4420, backs /var/lib/db mounted rw"
    }


def test_nvme_over_rdma_to_an_ipv6_target_follows_the_ipv6_route(machine: NetMachine) -> None:
    machine.nic("ib0", PORT_A)
    (machine.proc / "net" / "ipv6_route").write_text(
        "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001      ib0\n"
    )
    nvme_over_fabrics(machine, "rdma", "traddr=fd00::10,trsvcid=4420")
    assert machine.needed() == {
        PORT_A: "carries nvme1 → [fd00::10]:4420, backs /var/lib/db mounted rw"
    }


def test_a_software_iscsi_disk_needs_the_nic_towards_its_portal(machine: NetMachine) -> None:
    machine.nic("eth1", PORT_A)
    machine.route("eth1", "192.0.2.0/24")
    session = "platform/host2/session1"
    machine.block(f"{session}/target2:0:0/2:0:0:0/block/sdb", "8:16")
    machine.block(f"{session}/target2:0:0/2:0:0:0/block/sdb/sdb1", "8:17", partition=True)
    connection = machine.directory(f"{session}/connection1:0/iscsi_connection/connection1:0")
    (connection / "persistent_address").write_text("192.0.2.7\n")
    (connection / "persistent_port").write_text("3260\n")
    machine.mount("42 29 8:17 / /srv rw,relatime - ext4 /dev/sdb1 rw")
    assert machine.needed() == {
        PORT_A: "carries sdb (session1) → 192.0.2.7:3260, backs /srv mounted rw"
    }


def test_a_ceph_rbd_needs_every_nic_that_is_up(machine: NetMachine) -> None:
    machine.nic("eth1", PORT_A)
    machine.block("rbd/0/block/rbd0", "251:0")
    machine.mount("43 29 251:0 / /ceph rw,relatime - ext4 /dev/rbd0 rw")
    reason = "may carry rbd0 (Ceph RBD: its OSDs are not listed), backs /ceph mounted rw"
    assert machine.needed() == {VIRTIO_NET: reason, PORT_A: reason}


# --- parsers ----------------------------------------------------------------------------------

LITTLE_ENDIAN_ROUTES = f"""{ROUTE_HEADER}
eth0\t00000000\t0202000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0002000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
eth1\t0000A8C0\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


def test_proc_net_route_on_a_little_endian_cpu_parses() -> None:
    routes = parse_ipv4_routes(LITTLE_ENDIAN_ROUTES, "little")
    assert [(str(r.network), r.interface, r.metric) for r in routes] == [
        ("0.0.0.0/0", "eth0", 100),
        ("10.0.2.0/24", "eth0", 100),
    ]  # the RTF_REJECT route is left out


def test_proc_net_route_on_a_big_endian_cpu_parses() -> None:
    text = f"{ROUTE_HEADER}\neth0\t0A000200\t00000000\t0001\t0\t0\t0\tFFFFFF00\t0\t0\t0\n"
    assert [str(r.network) for r in parse_ipv4_routes(text, "big")] == ["10.0.2.0/24"]


def test_the_longest_prefix_wins_then_the_lowest_metric() -> None:
    routes = parse_ipv4_routes(LITTLE_ENDIAN_ROUTES, "little")
    assert route_interface(routes, ipaddress.IPv4Address("10.0.2.100")) == "eth0"
    assert route_interface(routes, ipaddress.IPv4Address("192.168.1.1")) == "eth0"  # default
    assert route_interface(routes, ipaddress.IPv6Address("::1")) is None


def test_proc_net_ipv6_route_parses_and_the_local_table_leads_to_lo() -> None:
    text = (
        "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
        "fe800000000000005054fffe12345678 80 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo\n"
    )
    routes = parse_ipv6_routes(text)
    assert route_interface(routes, ipaddress.IPv6Address("fe80::1")) == "eth0"
    assert route_interface(routes, ipaddress.IPv6Address("fe80::5054:fffe:1234:5678")) == "lo"


def test_proc_net_tcp_and_tcp6_give_each_sockets_endpoints() -> None:
    tcp = (
        f"{TCP_HEADER}\n   0: 0F02000A:D2F4 6402000A:2A39 01 00000000:00000000 00:00000000"
        " 00000000     0        0 5555 1 0000000000000000 20 4 30 10 -1\n"
    )
    assert parse_tcp_sockets(tcp, "little") == {
        5555: (
            Endpoint(ipaddress.IPv4Address("10.0.2.15"), 54004),
            Endpoint(ipaddress.IPv4Address("10.0.2.100"), 10809),
        )
    }
    remote = word("fd00::10", "little")
    tcp6 = (
        f"{TCP_HEADER}\n   0: 00000000000000000000000001000000:D2F4 {remote}:10EB 01"
        " 00000000:00000000 00:00000000 00000000     0        0 77 1 0 20 4 30 10 -1\n"
    )
    assert str(parse_tcp_sockets(tcp6, "little")[77][1]) == "[fd00::10]:4331"


def test_an_nvme_fabrics_address_splits_into_its_keys() -> None:
    assert parse_nvme_address("traddr=10.1.2.3,trsvcid=4420,src_addr=10.1.0.5\n") == {
        "traddr": "10.1.2.3",
        "trsvcid": "4420",
        "src_addr": "10.1.0.5",
    }
    assert parse_nvme_address("traddr=nn-0x1000:pn-0x2000") == {"traddr": "nn-0x1000:pn-0x2000"}


def test_an_nbd_server_behind_a_tunnel_needs_every_nic_that_is_up(machine: NetMachine) -> None:
    machine.virtual_nic("wg0", [])
    machine.route("wg0", "172.16.0.0/12")
    machine.nbd(0, pid=900)
    machine.nbd_client(900, "172.16.0.2:53000", "172.16.9.9:10809")
    machine.mount("40 29 43:0 / /mnt rw,relatime - ext4 /dev/nbd0 rw")
    assert machine.needed() == {
        VIRTIO_NET: "may carry nbd0 → 172.16.9.9:10809 (through wg0), backs /mnt mounted rw"
    }
