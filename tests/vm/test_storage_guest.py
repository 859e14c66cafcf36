"""Storage the running system needs that the mount table of PID 1 does not show, and a hang
the time limit cuts short, on the real kernel in the q35 guest (issue 17).

- An ext4 on an NBD disk, reached over the virtio-net at 04:00.0: the NBD server runs inside
  QEMU's user network (`guestfwd=...-cmd:` tests/vm/nbd_server.py on the connection's stdin
  and stdout), so nothing listens on the host and no packet leaves QEMU.
- An nvme disk mounted only inside a private mount namespace (busybox `unshare -m`), by a
  process that keeps writing to it through the teardown.
- The 9p share's remove() blocks (`--unprotect`), and `--time-limit` ends the run before
  `--unbind-timeout` would: no handoff, exit 5, everything else rolled back.

What the guest saw right before the kexec is busybox's read-back (tests/vm/guest/readback);
what survived is read back by the second kernel and, after QEMU exits, by the host (e2fsck,
debugfs) from the disk files themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm import guest
from tests.vm.guest import VIRTFS_BDF, GuestRun
from tests.vm.images.build import Images
from tests.vm.images.disk import make_ext4_image
from tests.vm.test_scenarios import (
    EXEC,
    NVME,
    NVME_PORT,
    assert_quiet_before_kexec,
    assert_second_kernel_reprobed,
    guest_uptime,
    scenario,
    state,
)

pytestmark = pytest.mark.vm

Boot = Callable[..., GuestRun]
NBD_SERVER = Path(__file__).resolve().parent / "nbd_server.py"
NBD_ADDRESS, NBD_PORT, GUEST_ADDRESS = "10.0.2.100", 10809, "10.0.2.15/24"
NIC = "0000:04:00.0"  # virtio-net on netdev n1, behind root port 00:05.0
NIC_PORT = "0000:00:05.0"
NIC_NETDEV = "-netdev user,id=n1,restrict=on"
OTHER_NICS = ("0000:02:00.0", "0000:06:01.0", "0000:07:00.0")
IDLE_NIC = "0000:02:00.0"  # e1000e, up on a network of its own: it carries nothing

# Bring up the NIC at 04:00.0 (lo too) with QEMU's usual guest address, busybox `ip`.
NIC_UP = f"""\
iface=$(ls /sys/bus/pci/devices/{NIC}/virtio*/net/)
ip link set lo up && ip link set "$iface" up && ip addr add {GUEST_ADDRESS} dev "$iface" || exit 8
echo "NBD-IFACE $iface"
"""
# And 02:00.0, up with an address on another network, its link up (e1000e reports carrier
# a moment later): an interface that is up is not, by that alone, one the session needs.
IDLE_NIC_UP = f"""\
idle=$(ls /sys/bus/pci/devices/{IDLE_NIC}/net/)
ip link set "$idle" up && ip addr add 10.0.3.15/24 dev "$idle" || exit 8
n=0; while [ "$(cat /sys/class/net/$idle/operstate)" != up ] && [ $n -lt 100 ]; do
    sleep 0.1; n=$((n + 1)); done
echo "IDLE-IFACE $idle operstate=$(cat /sys/class/net/$idle/operstate)"
"""
# Debian's nbd-client, the two ways a system runs it: through netlink (its default: once it
# exits no process holds the connection, the kernel does) or the ioctl interface (-nonetlink,
# as busybox's nbd-client: a process stays in NBD_DO_IT holding the socket).
NBD_CLIENT_MODES = {"netlink": "", "ioctl": " -nonetlink"}


def nbd_connect(mode: str) -> str:
    return (
        f"nbd-client {NBD_ADDRESS} {NBD_PORT} /dev/nbd0 -N disk{NBD_CLIENT_MODES[mode]} || exit 7\n"
    )


def nbd_machine(disk: Path, log: Path) -> guest.Machine:
    """q35 with the NBD server on 04:00.0's user network. restrict=on stays: it isolates the
    guest but does not affect explicitly set forwarding rules (QEMU's -netdev user docs)."""
    command = f"{sys.executable} {NBD_SERVER} {disk} {log}"
    assert "," not in command, command  # QEMU's option parser would split it
    netdev = f"{NIC_NETDEV},guestfwd=tcp:{NBD_ADDRESS}:{NBD_PORT}-cmd:{command}"
    topology = tuple(netdev if option == NIC_NETDEV else option for option in guest.TOPOLOGY)
    assert netdev in topology
    return dataclasses.replace(guest.Q35, topology=topology)


def host_fsck(disk: Path) -> None:
    """The file system is clean as the host reads the image (no repair: -n)."""
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def host_cat(disk: Path, name: str) -> str:
    cat = subprocess.run(
        ["debugfs", "-R", f"cat /{name}", str(disk)], capture_output=True, text=True
    )
    assert cat.returncode == 0, cat.stderr
    return cat.stdout


def step_reason(run: GuestRun, bdf: str, action: str) -> str:
    match = re.search(rf"^\[\s*\d+/\d+\] {bdf} {action} +\S+: (.*)$", run.log, re.M)
    assert match, f"no {action} step for {bdf}\n{run.tail(120)}"
    return match[1]


@pytest.mark.parametrize("mode", NBD_CLIENT_MODES)
def test_an_ext4_on_nbd_keeps_its_nic_and_its_data_reaches_the_next_kernel(
    mode: str, vm_images: Images, timed_boot: Callable[[Boot, Images], Boot], tmp_path: Path
) -> None:
    disk = make_ext4_image(tmp_path / "nbd.img", {"hello.txt": "from the host\n"})
    server_log = tmp_path / "nbd-server.log"
    boot = timed_boot(functools.partial(guest.boot, nbd_machine(disk, server_log)), vm_images)
    run = boot(
        scenario(
            NIC_UP
            + IDLE_NIC_UP
            + nbd_connect(mode)
            + "pid=$(cat /sys/block/nbd0/pid)\n"
            + 'alive=no; [ -d "/proc/$pid" ] && alive=yes\n'
            + 'echo "NBD-SIZE $(cat /sys/block/nbd0/size) pid=$pid alive=$alive"\n'
            # The session's TCP socket as /proc/net/tcp lists it (remote 10.0.2.100:10809,
            # ESTABLISHED), whoever holds it: the kernel does in netlink mode.
            + "echo \"NBD-TCP $(grep -c ' 6402000A:2A39 01 ' /proc/net/tcp)\"\n"
            "mkdir -p /mnt/nbd && mount -t ext4 /dev/nbd0 /mnt/nbd || exit 6\n"
            # Written and not synced: the page cache holds it when petitkexec starts, and
            # kexec-tools' sync() must still reach the server through 04:00.0.
            "echo fresh-$MARKER > /mnt/nbd/fresh.txt\n"
            f"{EXEC}\necho PK-EXIT $?\n"
        ),
        second_scenario=(
            NIC_UP
            + nbd_connect("netlink")
            + "mkdir -p /mnt/nbd && mount -t ext4 -o ro /dev/nbd0 /mnt/nbd || exit 6\n"
            "sed 's/^/NBD-FILE /' /mnt/nbd/fresh.txt\n"
            "umount /mnt/nbd && echo NBD-UNMOUNTED\n"
            "nbd-client -d /dev/nbd0 && echo NBD-DISCONNECTED\n"
        ),
    )
    # The kernel's nbd_start_device() records the pid of who connected it: in netlink mode
    # nbd-client has exited since; in ioctl mode it waits in NBD_DO_IT.
    alive = {"netlink": "no", "ioctl": "yes"}[mode]
    assert re.search(rf"^NBD-SIZE 131072 pid=\d+ alive={alive}$", run.log, re.M), run.tail(120)
    assert re.search(r"^IDLE-IFACE eth\d+ operstate=up$", run.log, re.M), run.tail(120)
    assert "NBD-TCP 1" in run.log, run.tail(120)
    # The NIC that carries the session, and the port above it, are protected; the reason
    # names the session (nbd0). No other NIC is, not even the one that is up: it carries
    # nothing.
    reason = step_reason(run, NIC, "protect")
    assert "nbd0" in reason, reason
    assert re.search(rf"{NIC_PORT} protect +held: above protected {NIC}", run.log), run.tail(120)
    readback = run.readback("pre-kexec")
    assert readback[NIC].driver == "virtio-pci" and readback[NIC].bus_master, run.tail(120)
    assert_quiet_before_kexec(run, protected={NIC, NIC_PORT})
    for other in OTHER_NICS:
        assert readback[other].driver is None, run.tail(120)
    # The second kernel reconnected and read what the first wrote (its mount replayed the
    # journal; the first kernel never unmounted).
    assert_second_kernel_reprobed(run)
    assert f"NBD-FILE fresh-{run.marker}" in run.log, run.tail(120)
    assert "NBD-UNMOUNTED" in run.log and "NBD-DISCONNECTED" in run.log, run.tail(120)
    # The server saw two sessions: the first kernel's, never closed (the kexec cut it), and
    # the second's, ended by its disconnect.
    served = server_log.read_text()
    assert served.count("transmission\n") == 2, served
    assert served.count("closed: NBD_CMD_DISC") == 1, served
    host_fsck(disk)
    assert host_cat(disk, "fresh.txt") == f"fresh-{run.marker}\n"


# The writer: its own mount namespace (busybox unshare -m: private propagation), the nvme
# disk mounted only there, one numbered line a tenth of a second, its count in /tmp (the
# same tmpfs on both sides) for the scenario to read.
NAMESPACE_WRITER = """\
mount -t ext4 /dev/nvme0n1 /mnt/ns || exit 1
n=0
while :; do
    n=$((n + 1))
    echo "line $n" >> /mnt/ns/log.txt
    echo $n > /tmp/written
    sleep 0.1
done
"""


def test_a_disk_mounted_only_in_a_private_mount_namespace_is_protected_and_keeps_its_data(
    boot: Boot, tmp_path: Path
) -> None:
    disk = make_ext4_image(tmp_path / "nvme.img", {"hello.txt": "from the host\n"})
    run = boot(
        scenario(
            "mkdir -p /mnt/ns\n"
            f"unshare -m sh -c '{NAMESPACE_WRITER}' &\nwriter=$!\n"
            'n=0; while [ "$(cat /tmp/written 2>/dev/null || echo 0)" -lt 5 ] && [ $n -lt 300 ]; '
            "do sleep 0.1; n=$((n + 1)); done\n"
            'echo "WRITER pid=$writer ns=$(readlink /proc/$writer/ns/mnt)'
            ' ours=$(readlink /proc/self/ns/mnt)"\n'
            "echo \"NS-MOUNT-VISIBLE $(grep -c ' /mnt/ns ' /proc/self/mountinfo)\"\n"
            'echo "WRITER-BEFORE $(cat /tmp/written)"\n'
            f"{EXEC}\necho PK-EXIT $?\n"
        ),
        nvme_image=disk,
        second_scenario=(
            "mkdir -p /mnt/ns && mount -t ext4 -o ro /dev/nvme0n1 /mnt/ns || exit 1\n"
            'echo "NS-FILE lines=$(wc -l < /mnt/ns/log.txt) last=$(tail -n 1 /mnt/ns/log.txt)"\n'
            "umount /mnt/ns && echo NS-UNMOUNTED\n"
        ),
    )
    writer = re.search(r"^WRITER pid=(\d+) ns=(\S+) ours=(\S+)$", run.log, re.M)
    assert writer, run.tail(120)
    pid, namespace, ours = writer.groups()
    assert namespace != ours, run.tail(120)  # its own mount namespace ...
    assert "NS-MOUNT-VISIBLE 0" in run.log, run.tail(120)  # ... where alone the disk is mounted
    reason = step_reason(run, NVME, "protect")
    assert f"pid {pid}" in reason and "namespace" in reason, reason
    assert re.search(rf"{NVME_PORT} protect +held: above protected {NVME}", run.log)
    readback = run.readback("pre-kexec")
    assert readback[NVME].driver == "nvme" and readback[NVME].bus_master, run.tail(120)
    assert_quiet_before_kexec(run, protected={NVME, NVME_PORT})
    assert_second_kernel_reprobed(run)
    before = int(re.search(r"^WRITER-BEFORE (\d+)$", run.log, re.M)[1])  # type: ignore[index]
    second = re.search(r"^NS-FILE lines=(\d+) last=line (\d+)$", run.log, re.M)
    assert second and second[1] == second[2], run.tail(120)
    # Everything written before petitkexec started is there, and more: it kept writing.
    assert int(second[1]) > before, (before, second[0])
    assert "NS-UNMOUNTED" in run.log
    host_fsck(disk)
    lines = host_cat(disk, "log.txt").splitlines()
    assert lines == [f"line {n}" for n in range(1, int(second[1]) + 1)], lines[-3:]


def test_a_hang_cut_short_by_the_time_limit_blocks_the_handoff_and_rolls_back(
    boot: Boot, tmp_path: Path, record_timing: Callable[[str, str], None]
) -> None:
    """--time-limit below --unbind-timeout: the time limit is what ends the 9p share's hung
    remove(); the device lock it holds would hang the kexec's device_shutdown() too."""
    run = boot(
        scenario(
            "mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt\n"
            "readback before\n"
            f"{EXEC} --unprotect {VIRTFS_BDF} --unbind-timeout 20 --time-limit 8\n"
            'echo "PK-EXIT $? uptime=$(cut -d " " -f 1 /proc/uptime)"\n'
            "readback after\n"
        ),
        virtfs_dir=tmp_path,
        poweroff_grace=5,  # power-off hangs on the device lock too: QEMU is killed
        timeout=180,
    )
    assert "PK-EXIT 5 " in run.log, run.tail(120)
    assert "KEXEC-START" not in run.log and not run.second_up, run.tail(120)
    record_timing(
        "time limit 8 s, unbind deadline 20 s: petitkexec start -> exit (guest clock)",
        f"{guest_uptime(run, 'PK-EXIT 5') - guest_uptime(run, 'PK-START'):.1f}s",
    )
    reason = step_reason(run, VIRTFS_BDF, "unbind")
    assert "time limit" in reason, reason
    assert re.search(r"^stopped: .*time limit", run.log, re.M), run.tail(120)
    # Everything else rolled back, as busybox reads it: drivers and COMMAND as before. The
    # stuck function reads unbound: the kernel drops the driver link before remove().
    before, after = state(run, "before"), state(run, "after")
    assert after.pop(VIRTFS_BDF)[0] is None and before.pop(VIRTFS_BDF)[0] == "virtio-pci"
    assert after == before, run.tail(120)
