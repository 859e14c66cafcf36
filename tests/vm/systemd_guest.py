"""A real Debian 12 systemd guest for `systemctl kexec` with petitkexec's shutdown hook.

    images = build()                           # cached in .cache/vm/systemd/
    run = boot_systemd(images, mode="kexec")   # one QEMU run: boot, systemctl kexec, boot 2
    assert run.second_up and run.verify_passed, run.tail()

By hand: ``python -m tests.vm.systemd_guest [--force] [kexec] [hang] [missing-driver]``
builds (``--force``: from scratch), then boots each mode with the console on stderr.

The root file system is Debian's own packages put together by `mmdebstrap` (bookworm, amd64,
from the Debian mirror the host's apt is configured with), with petitkexec installed from the
working tree the Debian way: the package scripts/build-deb makes (tests/vm/debian_package.py)
installed with `apt-get install ./petitkexec_*.deb`, which puts the hook, the units (enabled by
its postinst) and /etc/default/petitkexec in place, over Debian's own python3-click,
python3-pyudev and python3-structlog. It is cached in two steps, each keyed by a hash of what
shapes it:

- ``base-<key>.tar``: mmdebstrap's output (the package list, the debconf and initramfs settings
  below). The cold build downloads ~200 MB and takes about 3 minutes here;
- ``image-<key>/``: the base plus the package and the test's guest files, as a tree (exported
  over virtio-9p when 9p is the root) and as ``root.ext4`` (``mkfs.ext4 -d``). Keyed also by
  the .deb (itself cached by the files that shape it), so an edit rebuilds only this.

The guest runs the test by itself (``pktest.service``, after multi-user.target):

- first boot: lists its devices (``FIRST-DEVICE``), runs ``systemd-analyze verify`` on the two
  units (``PKTEST-ANALYZE``), ``kexec -l`` with its own command line plus ``pktest=second``,
  prints ``PKTEST-SYSTEMCTL-KEXEC uptime=S`` and runs ``systemctl kexec``. systemd's shutdown
  runs the hook, which logs ``petitkexec: ...`` lines to the kernel log (``loglevel=7`` puts
  them on the console), then execs ``/sbin/kexec -e``: a wrapper that prints ``READBACK``
  lines (driver and PCI COMMAND of every function, read with coreutils' ``od``, not by
  petitkexec) and execs the real kexec-tools (``/sbin/kexec.real``);
- second boot (``pktest=second``): ``PETITKEXEC-SECOND-UP <marker> uptime=S``, its devices
  (``SECOND-DEVICE``), petitkexec-verify.service's result (``PKTEST-VERIFY``), ``SECOND-DONE``,
  then it powers off.

With ``mode="hang"`` the root file system is the image's tree over virtio-9p (a writable
overlay on the host: the cache stays pristine), ``/etc/petitkexec.toml`` lifts the share's
protection (``unprotect``), so the hook's unbind of the share's device hangs in
``p9_virtio_remove()``; its ``unbind-timeout`` (60 s) is longer than the hook's time limit
(``PETITKEXEC_TIME_LIMIT=10``), which is what cuts the hang short. ``mode="hang-past-limit"``
is the same with the unbind's deadline
(``unbind-timeout``) and the hook's time limit raised past systemd's 90 s hook limit.

With ``mode="missing-driver"`` the first boot is the ``kexec`` one, but the second kernel's
command line gets ``module_blacklist=e1000e`` (the first kernel's ``pkkeepout=e1000e`` asks
for it): udev's modalias load of e1000e for 02:00.0 goes through kmod to init_module(), which
the kernel refuses (``Module e1000e is blacklisted``), so 02:00.0 comes up without a driver
and petitkexec-verify.service must fail naming it. The second boot prints
``SECOND-KEPT-OUT <module> loaded=yes|no`` (``/sys/module/<module>``) for each module kept out.

With ``mode="ssh"`` nothing happens by itself: each boot (the first, and every kexec that
reuses its command line) puts the run's key in root's authorized_keys, starts sshd on a
virtio-net of its own (QEMU forwards 127.0.0.1:PORT to it) and prints ``PKTEST-SSH-READY``;
`while_running` drives the guest from the host (tests/vm/test_ansible_guest.py: Ansible).

QEMU is always killed at `timeout`, and `poweroff_grace` seconds after ``SECOND-DONE``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from . import debian_package, guest
from .images.lanes import cache_dir
from .images.run import ImageError, log, run

SUITE = "bookworm"
ARCH = "amd64"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "python3",
    # petitkexec's dependencies, Debian's own: `apt install ./petitkexec_*.deb` then needs
    # nothing from the network (mmdebstrap leaves no package lists in the root).
    "python3-click",
    "python3-pyudev",
    "python3-structlog",
    "kexec-tools",
    "linux-image-amd64",
    "initramfs-tools",
    "e2fsprogs",
    "util-linux",
    # Mode ssh: the Ansible play reaches the guest over SSH, and its apt module needs
    # python3-apt (it would otherwise apt-get it, with no package lists and no network).
    "openssh-server",
    "python3-apt",
)
# The initramfs only needs what mounts the root (virtio-blk, nvme, ext4, or 9p over virtio);
# MODULES=list keeps it small (~7 MB instead of ~35 MB), which both kernels unpack under TCG.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "nvme", "ext4", "9pnet_virtio", "9p")
# Run inside the new root by mmdebstrap after the essential packages, before the rest:
# kexec-tools must not load a kernel by itself at shutdown (LOAD_KEXEC, its debconf question).
ESSENTIAL_HOOKS = (
    'echo "kexec-tools kexec-tools/load_kexec boolean false" | chroot "$1" debconf-set-selections',
    'echo "kexec-tools kexec-tools/use_grub_config boolean false"'
    ' | chroot "$1" debconf-set-selections',
    'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"',
    'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/petitkexec-test.conf"',
    "printf '%s\\n' " + " ".join(INITRAMFS_MODULES) + ' > "$1/usr/share/initramfs-tools/'
    'modules.d/petitkexec-test"',
)
HOST_TOOLS = (
    "mmdebstrap",
    "apt-get",
    "qemu-system-x86_64",
    "mkfs.ext4",
    "unshare",
    "chroot",
    *debian_package.HOST_TOOLS,
)
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SMP = 1
ROOT_BDF = "0000:01:00.0"  # virtio-blk behind root port 00:02.0: the root disk (mode kexec)
ROOT_PORT_BDF = "0000:00:02.0"
VIRTFS_BDF = "0000:00:09.0"  # virtio-9p: the root file system (mode hang)
VIRTFS_TAG = "pkroot"
KEPT_OUT_BDF = "0000:02:00.0"  # e1000e: its driver is kept out of the second kernel
KEPT_OUT_MODULE = "e1000e"  # (mode missing-driver)
MODES = ("kexec", "hang", "hang-past-limit", "missing-driver", "ssh")
# mode hang-past-limit: the hung unbind outlasts systemd's 90 s hook limit (its deadline and
# the hook's time limit raised past it), so systemd's SIGTERM comes while petitkexec waits.
PAST_LIMIT_UNBIND_TIMEOUT = 100
PAST_LIMIT_TIME_LIMIT = 120
# mode hang: the hook's time limit (/etc/default/petitkexec) below the unbind deadline
# (/etc/petitkexec.toml), so the time limit is what ends the hung unbind.
HANG_TIME_LIMIT = 10
HANG_UNBIND_TIMEOUT = 60
NINEP_ROOTFLAGS = "trans=virtio,version=9p2000.L,msize=262144,cache=loose"
TOPOLOGY: tuple[str, ...] = (
    *(
        f"-device pcie-root-port,id=rp{n},chassis={n},slot={n},bus=pcie.0,addr={n + 1:#x}"
        for n in range(1, 5)
    ),
    # 01:00.0 the root disk (its file is given by boot_systemd: -drive id=rootdisk)
    "-device virtio-blk-pci,drive=rootdisk,bus=rp1",
    # 02:00.0 e1000e
    "-netdev user,id=n0,restrict=on",
    "-device e1000e,romfile=,netdev=n0,bus=rp2,mac=52:54:00:00:01:10",
    # 03:00.0 xHCI
    "-device qemu-xhci,id=xhci0,bus=rp3",
    # 04:00.0 an nvme with a blank namespace that nothing mounts
    "-device nvme,serial=pksd0001,drive=blankdisk,bus=rp4",
    # 00:08.0 virtio-rng on the root bus
    "-device virtio-rng-pci,bus=pcie.0,addr=0x8",
)

# ---------------------------------------------------------------------------------------------
# Files put into the image (path below the root: (mode, text)).

PKTEST = r"""#!/bin/sh
# The systemd guest's test driver (tests/vm/systemd_guest.py); pktest.service runs it once
# multi-user.target is reached. Everything goes to the console, which the host captures.
exec >/dev/console 2>&1
arg() { for word in $(cat /proc/cmdline); do case $word in "$1"=*) echo "${word#*=}";; esac; done; }
up() { cut -d' ' -f1 /proc/uptime; }
devices() {
    for d in /sys/bus/pci/devices/*; do
        driver=-
        [ -e "$d/driver" ] && driver=$(basename "$(readlink "$d/driver")")
        echo "$1 ${d##*/} driver=$driver"
    done
}
marker=$(arg pkmarker)
mode=$(arg pktest)
boot_line() {
    # type_of_loader (boot_params offset 0x210) as the kernel kept it: QEMU's -kernel loader
    # writes 0xb0, kexec-tools 0xd0 (Documentation/arch/x86/boot.rst's loader ids B and D).
    echo "PKTEST-BOOT $marker boot_id=$(cat /proc/sys/kernel/random/boot_id)" \
        "loader=0x$(od -An -tx1 -j528 -N1 /sys/kernel/boot_params/data | tr -d ' ')" \
        "kexec_loaded=$(cat /sys/kernel/kexec_loaded) uptime=$(up)"
}
case $mode in
ssh)
    # The Ansible play drives this boot and every kexec after it (their command line is
    # this one, reused): a key for root, the SSH NIC, sshd; nothing else.
    boot_line
    mkdir -p -m 0700 /root/.ssh
    echo "ssh-ed25519 $(arg pksshkey) pktest" >/root/.ssh/authorized_keys
    mkdir -p /var/lib/prometheus/node-exporter  # as if node_exporter were installed
    if [ ! -e /var/lib/pktest-ssh-prepared ]; then
        # Once per run (the disk outlives each kexec): the play installs the package itself.
        dpkg -r petitkexec >/dev/null
        echo "PKTEST-UNINSTALLED petitkexec=$(command -v petitkexec || echo none)"
        touch /var/lib/pktest-ssh-prepared
    fi
    systemctl start systemd-networkd.service ssh.service
    echo "PKTEST-SSH-READY $marker sshd=$(systemctl is-active ssh.service) uptime=$(up)"
    ;;
second)
    echo "PETITKEXEC-SECOND-UP $marker uptime=$(up)"
    udevadm settle --timeout=60
    echo "SECOND-SETTLED uptime=$(up)"
    devices SECOND-DEVICE
    for module in $(arg module_blacklist | tr , ' '); do
        loaded=no
        [ -e "/sys/module/$module" ] && loaded=yes
        echo "SECOND-KEPT-OUT $module loaded=$loaded"
    done
    while [ "$(systemctl show -P ActiveState petitkexec-verify.service)" = activating ]; do
        sleep 1
    done
    echo "PKTEST-VERIFY state=$(systemctl show -P ActiveState petitkexec-verify.service)" \
        "result=$(systemctl show -P Result petitkexec-verify.service)" \
        "status=$(systemctl show -P ExecMainStatus petitkexec-verify.service)" \
        "condition=$(systemctl show -P ConditionResult petitkexec-verify.service)"
    journalctl -b -o cat -u petitkexec-verify.service | sed 's/^/PKTEST-VERIFY-LOG /'
    echo "SECOND-DONE uptime=$(up)"
    # --force: no unit is stopped (petitkexec-snapshot's ExecStop would take ~15 s under TCG);
    # systemd-shutdown still runs, and with it the hook (argv[1] poweroff: it does nothing).
    systemctl --no-block --force poweroff
    ;;
*)
    echo "PKTEST-FIRST-UP $marker mode=$mode uptime=$(up)"
    udevadm settle --timeout=60
    devices FIRST-DEVICE
    if [ -n "$(arg pkunprotect)" ]; then
        printf 'unprotect = ["%s"]\n' "$(arg pkunprotect)" >/etc/petitkexec.toml
        [ -z "$(arg pkunbindtimeout)" ] ||
            printf 'unbind-timeout = %s\n' "$(arg pkunbindtimeout)" >>/etc/petitkexec.toml
        chown root:root /etc/petitkexec.toml
        chmod 0644 /etc/petitkexec.toml
        echo "PKTEST-CONFIG $(stat -c '%U:%G %a' /etc/petitkexec.toml) $(cat /etc/petitkexec.toml)"
    fi
    echo "PKTEST-ROOT $(findmnt -n -o SOURCE,FSTYPE,OPTIONS /)"
    systemd-analyze verify /lib/systemd/system/petitkexec-snapshot.service \
        /lib/systemd/system/petitkexec-verify.service >/run/pktest-analyze 2>&1
    status=$?
    sed 's/^/PKTEST-ANALYZE /' /run/pktest-analyze
    echo "PKTEST-ANALYZE-EXIT $status"
    echo "PKTEST-SNAPSHOT-UNIT $(systemctl is-active petitkexec-snapshot.service)"
    defaults=/etc/default/petitkexec
    limit=$(arg pktimelimit)
    [ -z "$limit" ] ||
        sed -i "s/^PETITKEXEC_TIME_LIMIT=[0-9]*/PETITKEXEC_TIME_LIMIT=$limit/" "$defaults"
    echo "PKTEST-DEFAULTS $(grep '^PETITKEXEC=' /etc/default/petitkexec)"
    echo "PKTEST-TIME-LIMIT $(grep '^PETITKEXEC_TIME_LIMIT=' /etc/default/petitkexec)"
    append=
    for word in $(cat /proc/cmdline); do
        case $word in pktest=*|pkunprotect=*|pkkeepout=*|pkunbindtimeout=*|pktimelimit=*) ;;
        *) append="$append $word";; esac
    done
    # The kernel refuses init_module() for a module named in module_blacklist= (-EPERM):
    # the second kernel comes up without that driver, as if it had not been built.
    [ -n "$(arg pkkeepout)" ] && append="$append module_blacklist=$(arg pkkeepout)"
    kexec -l /boot/vmlinuz --initrd=/boot/initrd.img --append="${append# } pktest=second"
    echo "PKTEST-KEXEC-LOADED rc=$? loaded=$(cat /sys/kernel/kexec_loaded)"
    echo "PKTEST-SYSTEMCTL-KEXEC uptime=$(up)"
    systemctl --no-block kexec
    echo "PKTEST-SYSTEMCTL-KEXEC-RC $?"
    ;;
esac
"""

PKTEST_UNIT = """[Unit]
Description=petitkexec systemd-guest test (tests/vm/systemd_guest.py)
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/pktest
StandardOutput=null

[Install]
WantedBy=multi-user.target
"""

# systemd-shutdown execs its compiled-in /sbin/kexec -e: this read-back happens after the hook,
# right before the kexec syscall, by coreutils rather than petitkexec (READBACK as guest.py).
KEXEC_WRAPPER = r"""#!/bin/sh
# tests/vm/systemd_guest.py: before `kexec -e`, print every PCI function's driver and COMMAND
# register to the console, then run the real kexec-tools (dpkg-diverted to /sbin/kexec.real).
case " $* " in
*" -e "*|*" --exec "*)
    {
        echo "READBACK-BEGIN tag=pre-kexec uptime=$(cut -d' ' -f1 /proc/uptime)"
        count=0
        for d in /sys/bus/pci/devices/*; do
            driver=-
            [ -e "$d/driver" ] && driver=$(basename "$(readlink "$d/driver")")
            command=$(od -An -tx2 -j4 -N2 "$d/config" 2>/dev/null | tr -d ' \n')
            echo "READBACK ${d##*/} driver=$driver command=${command:-----} tag=pre-kexec"
            count=$((count + 1))
        done
        echo "READBACK-END tag=pre-kexec count=$count"
        echo "KEXEC-START uptime=$(cut -d' ' -f1 /proc/uptime) args=$*"
    } >/dev/console 2>&1
    ;;
esac
exec /sbin/kexec.real "$@"
"""

GUEST_FILES: dict[str, tuple[int, str]] = {
    "usr/local/sbin/pktest": (0o755, PKTEST),
    "etc/systemd/system/pktest.service": (0o644, PKTEST_UNIT),
    "etc/hostname": (0o644, "pkguest\n"),
    # A fixed machine id: not a first boot (no systemd-firstboot prompts on the console).
    "etc/machine-id": (0o444, "5e7c1f7a9d0b4e2f8a6c3b1d2e4f6a80\n"),
    "etc/resolv.conf": (0o644, ""),
}
# Mode ssh: the NIC the play reaches (virtio-net, its own user netdev with the port forward),
# with slirp's fixed guest address: nothing waits for DHCP.
SSH_MAC = "52:54:00:00:02:20"
GUEST_FILES["etc/systemd/network/50-pkssh.network"] = (
    0o644,
    f"[Match]\nMACAddress={SSH_MAC}\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n",
)
GUEST_LINKS: dict[str, str] = {
    "etc/systemd/system/multi-user.target.wants/pktest.service": "../pktest.service",
    # No getty on the console the host reads (nor on tty1), no first-boot wizard.
    "etc/systemd/system/serial-getty@.service": "/dev/null",
    "etc/systemd/system/getty@.service": "/dev/null",
    "etc/systemd/system/systemd-firstboot.service": "/dev/null",
}
# Written after CHROOT_STEPS (dpkg-divert has moved kexec-tools' binary to /sbin/kexec.real).
AFTER_FILES: dict[str, tuple[int, str]] = {"usr/sbin/kexec": (0o755, KEXEC_WRAPPER)}
# Where the .deb is put in the root, under its own name.
DEB_DIR = "root"
# Run in the root (chroot) in this order.
CHROOT_STEPS: tuple[tuple[str, ...], ...] = (
    ("dpkg-divert", "--local", "--rename", "--divert", "/sbin/kexec.real", "--add", "/sbin/kexec"),
    # The README's install on Debian. Its dependencies are in the base already (PACKAGES):
    # apt needs no package list and no network.
    ("sh", "-c", f"cd /{DEB_DIR} && apt-get install -y -q ./petitkexec_*.deb"),
    ("sh", "-c", f"rm /{DEB_DIR}/petitkexec_*.deb"),
)


# ---------------------------------------------------------------------------------------------
# Building


def cache() -> Path:
    return cache_dir() / "systemd"


@dataclasses.dataclass(frozen=True)
class SystemdImages:
    tree: Path  # the root file system as a directory (the 9p root's lower layer)
    disk: Path  # the same as ext4
    kernel: Path
    initrd: Path
    kernel_version: str
    info: dict[str, object]


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _base_key() -> str:
    return _digest(SUITE, ARCH, PACKAGES, ESSENTIAL_HOOKS)


def _image_key(base_key: str, deb: Path) -> str:
    package = (deb.name, hashlib.sha256(deb.read_bytes()).hexdigest())
    return _digest(base_key, GUEST_FILES, GUEST_LINKS, CHROOT_STEPS, AFTER_FILES, package)


def host_sources(suite: str = SUITE) -> list[str]:
    """One-line sources ("deb URI SUITE main") for `suite` and its -updates/-security, from
    the host's own apt configuration (no mirror is written into the repository)."""
    out = run(
        [
            "apt-get",
            "indextargets",
            "--format",
            "$(SITE) $(RELEASE) $(COMPONENT)",
            "Identifier: Packages",
        ]
    ).stdout
    lines = []
    for row in out.splitlines():
        fields = row.split()
        if len(fields) != 3:
            continue
        site, release, component = fields
        if component == "main" and (release == suite or release.startswith(f"{suite}-")):
            line = f"deb {site} {release} main"
            if line not in lines:
                lines.append(line)
    if not any(f" {suite} " in line for line in lines):
        raise ImageError(
            f"the host's apt has no Debian {suite} main source (apt-get indextargets): "
            "mmdebstrap needs one; run apt-get update"
        )
    return lines


def _build_base(target: Path) -> float:
    """mmdebstrap into `target` (a tarball); returns the seconds it took."""
    started = time.monotonic()
    tmp = target.with_suffix(".tmp.tar")
    args = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--arch={ARCH}",
        f"--include={','.join(PACKAGES)}",
        *(f"--essential-hook={hook}" for hook in ESSENTIAL_HOOKS),
        SUITE,
        str(tmp),
        *host_sources(),
    ]
    log(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages and their dependencies) -> {target}")
    run(args)
    seconds = round(time.monotonic() - started, 1)
    target.with_suffix(".json").write_text(
        json.dumps({"mmdebstrap_seconds": seconds, "bytes": tmp.stat().st_size})
    )
    tmp.rename(target)
    return seconds


def _write_files(root: Path, files: dict[str, tuple[int, str]]) -> None:
    for rel, (mode, text) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)
        path.chmod(mode)


def _write_guest_files(root: Path) -> str:
    _write_files(root, GUEST_FILES)
    for rel, target in GUEST_LINKS.items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in the root's /boot, found {kernels}")
    kver = kernels[0].name.removeprefix("vmlinuz-")
    for name in ("vmlinuz", "initrd.img"):
        link = root / "boot" / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"{name}-{kver}")
    # sshd only where pktest starts it (mode ssh): the other modes boot as they did.
    for rel in ("multi-user.target.wants/ssh.service", "sshd.service"):
        (root / "etc/systemd/system" / rel).unlink(missing_ok=True)
    defaults = (root / "etc/default/kexec").read_text()
    if "LOAD_KEXEC=false" not in defaults.splitlines():
        raise ImageError(f"kexec-tools would load a kernel at shutdown:\n{defaults}")
    return kver


def _chroot_install(root: Path) -> None:
    """Run CHROOT_STEPS in the root, with /proc mounted in a private mount namespace (gone
    with it: nothing stays mounted on the host)."""
    env = {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    script = "\n".join(
        [
            "set -eu",
            'mount -t proc proc "$1/proc"',
            *('chroot "$1" ' + shlex.join(step) for step in CHROOT_STEPS),
        ]
    )
    run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root)],
        env=env,
    )


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _build_image(base: Path, image: Path, deb: Path) -> dict[str, object]:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{image.name}.", dir=image.parent))
    try:
        tree = work / "root"
        tree.mkdir()
        run(["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-xpf", str(base)])
        extracted = time.monotonic()
        kver = _write_guest_files(tree)
        shutil.copyfile(deb, tree / DEB_DIR / deb.name)
        _chroot_install(tree)
        _write_files(tree, AFTER_FILES)
        if not (tree / "usr/sbin/kexec.real").is_file():
            raise ImageError("dpkg-divert did not move kexec-tools' kexec to /sbin/kexec.real")
        (tree / "etc/resolv.conf").write_text("")
        installed = time.monotonic()
        for name in ("petitkexec.shutdown",):
            if not (tree / "usr/lib/systemd/system-shutdown" / name).exists():
                raise ImageError(f"{deb.name} did not install the shutdown hook")
        size = _tree_bytes(tree) * 13 // 10 + (256 << 20)
        disk = work / "root.ext4"
        with open(disk, "wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-L", "pkroot", "-d", str(tree), str(disk)])
        made = time.monotonic()
        info: dict[str, object] = {
            "kernel_version": kver,
            "extract_seconds": round(extracted - started, 1),
            "install_seconds": round(installed - extracted, 1),
            "mkfs_seconds": round(made - installed, 1),
            "image_seconds": round(made - started, 1),
            "disk_bytes": size,
            "defaults": (tree / "etc/default/petitkexec").read_text(),
            "deb": deb.name,
            "deb_bytes": deb.stat().st_size,
        }
        (work / "info.json").write_text(json.dumps(info, indent=1))
        work.rename(image)
        return info
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _ensure_base(root: Path, force: bool) -> tuple[Path, float | None]:
    """The cached base tarball, built if missing (or `force`), and the seconds that took
    (None: cached). Called with the cache's lock held."""
    base = root / f"base-{_base_key()}.tar"
    if force or not base.exists():
        for old in [*root.glob("base-*.tar"), *root.glob("base-*.json")]:
            old.unlink()
        return base, round(_build_base(base), 1)
    return base, None


def base_tarball() -> Path:
    """mmdebstrap's Debian 12 root, as the guest starts from it: for a test that needs a fresh
    Debian 12 root without booting it (tests/vm/test_debian_package.py). Extract it before
    the next build() may replace it (a change of PACKAGES)."""
    root = cache()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_base(root, force=False)[0]


def build(*, force: bool = False) -> SystemdImages:
    """The cached base and image, built if missing (or `force`)."""
    root = cache()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        base, base_seconds = _ensure_base(root, force)
        base_key = _base_key()
        deb = debian_package.build_deb()
        image = root / f"image-{_image_key(base_key, deb)}"
        built = False
        if force and image.exists():
            shutil.rmtree(image)
        if not image.exists():
            _build_image(base, image, deb)
            built = True
            for old in root.glob("image-*"):
                if old != image:
                    shutil.rmtree(old, ignore_errors=True)
        info = json.loads((image / "info.json").read_text())
        info["base_build_seconds"] = base_seconds  # None: cached
        base_info = base.with_suffix(".json")
        if base_info.exists():
            info["base"] = json.loads(base_info.read_text())
        info["image_built"] = built
        info["ready_seconds"] = round(time.monotonic() - started, 1)
        log(
            f"systemd guest image {image.name} ready in {info['ready_seconds']}s "
            f"(base {'cached' if base_seconds is None else f'built in {base_seconds}s'}, "
            f"image {'built in ' + str(info['image_seconds']) + 's' if built else 'cached'})"
        )
        kver = str(info["kernel_version"])
        return SystemdImages(
            tree=image / "root",
            disk=image / "root.ext4",
            kernel=image / "root/boot" / f"vmlinuz-{kver}",
            initrd=image / "root/boot" / f"initrd.img-{kver}",
            kernel_version=kver,
            info=info,
        )


# ---------------------------------------------------------------------------------------------
# Booting

# systemd-shutdown (252) prints this, then runs /usr/lib/systemd/system-shutdown/* at once.
SHUTDOWN_DETACHED = "All filesystems, swaps, loop devices, MD devices and DM devices detached"
_PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]\s(.*)$")
_UPTIME = re.compile(r"\buptime=(\d+\.\d+)")
_STEP = re.compile(r"^\[\s*\d+/\d+\]\s+(\S+)\s+(\S+)\s+(.*)$")
_BDF_FIRST = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7] ")


@dataclasses.dataclass(frozen=True)
class SystemdRun(guest.GuestRun):
    """One QEMU run of the systemd guest: a guest.GuestRun (READBACK, SECOND-DEVICE, the
    marker, timings, the log) plus what this guest says."""

    mode: str = "kexec"
    arrivals: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (host s, line)

    def tail(self, lines: int = 80) -> str:
        return super().tail(lines)

    def lines_with(self, word: str) -> list[str]:
        """Console lines containing `word`, from `word` on (a kernel prefix cut off)."""
        return [line[line.index(word) :] for line in self.log.splitlines() if word in line]

    def values(self, word: str) -> list[str]:
        return [line[len(word) :].strip() for line in self.lines_with(word + " ")]

    @property
    def hook_lines(self) -> list[tuple[float | None, str]]:
        """The hook's report as the kernel printed it: (printk time, text after `petitkexec: `)."""
        found = []
        for line in self.log.splitlines():
            at = line.find("petitkexec: ")
            if at < 0:
                continue
            m = _PRINTK.match(line)
            found.append((float(m.group(1)) if m else None, line[at + len("petitkexec: ") :]))
        return found

    @property
    def hook_text(self) -> list[str]:
        return [text for _, text in self.hook_lines]

    @property
    def steps(self) -> dict[str, tuple[str, str]]:
        """The hook's step lines (`[ 7/14] BDF ACTION  DETAIL`): BDF -> (action, detail)."""
        found = {}
        for text in self.hook_text:
            m = _STEP.match(text)
            if m:
                found[m.group(1)] = (m.group(2), m.group(3))
        return found

    @property
    def teardown_exit(self) -> int | None:
        for text in self.hook_text:
            m = re.match(r"teardown exit (\d+)$", text)
            if m:
                return int(m.group(1))
        return None

    def devices(self, word: str) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for value in self.values(word):
            m = re.match(r"(\S+) driver=(\S+)", value)
            if m:
                found[m.group(1)] = None if m.group(2) == "-" else m.group(2)
        return found

    @property
    def first_devices(self) -> dict[str, str | None]:
        return self.devices("FIRST-DEVICE")

    @property
    def analyze_exit(self) -> int | None:
        values = self.values("PKTEST-ANALYZE-EXIT")
        return int(values[-1]) if values else None

    @property
    def analyze_output(self) -> list[str]:
        return [line[len("PKTEST-ANALYZE ") :] for line in self.lines_with("PKTEST-ANALYZE ")]

    @property
    def verify(self) -> dict[str, str]:
        values = self.values("PKTEST-VERIFY")
        return dict(w.split("=", 1) for w in values[-1].split() if "=" in w) if values else {}

    @property
    def verify_log(self) -> list[str]:
        """petitkexec-verify.service's journal in the second boot (systemd's lines too)."""
        return self.values("PKTEST-VERIFY-LOG")

    @property
    def verify_differences(self) -> list[str]:
        """`petitkexec verify`'s per-function lines (`<bdf> unbound (was bound to e1000e)`):
        the only lines of the unit's journal that start with a BDF."""
        return [line for line in self.verify_log if _BDF_FIRST.match(line)]

    @property
    def kept_out(self) -> dict[str, bool]:
        """The second kernel's module_blacklist= modules: module -> loaded anyway."""
        found = {}
        for value in self.values("SECOND-KEPT-OUT"):
            m = re.match(r"(\S+) loaded=(yes|no)", value)
            if m:
                found[m.group(1)] = m.group(2) == "yes"
        return found

    @property
    def verify_passed(self) -> bool:
        v = self.verify  # a failed ConditionPathExists= (no snapshot) is "success" too
        return (v.get("result"), v.get("status"), v.get("condition")) == ("success", "0", "yes")

    def uptime(self, word: str) -> float | None:
        for line in self.lines_with(word + " "):
            m = _UPTIME.search(line)
            if m:
                return float(m.group(1))
        return None

    def printk_time(self, text: str) -> float | None:
        """The kernel time stamp of the first console line containing `text`."""
        for line in self.log.splitlines():
            m = _PRINTK.match(line)
            if m and text in m.group(2):
                return float(m.group(1))
        return None

    @property
    def hook_seconds(self) -> float | None:
        """Guest clock: from systemd-shutdown's last message before it runs the hooks to the
        hook's `teardown exit` line (the hook's own run, Python start-up included)."""
        start = self.printk_time(SHUTDOWN_DETACHED)
        end = self.printk_time("petitkexec: teardown exit")
        return None if start is None or end is None else end - start

    @property
    def systemctl_kexec_to_second_guest_seconds(self) -> float | None:
        """Guest clocks: from `PKTEST-SYSTEMCTL-KEXEC uptime=` (right before `systemctl kexec`)
        to the first kernel's "Starting new kernel", plus the second kernel's uptime at its
        marker (purgatory and decompression are not on either clock)."""
        start = self.uptime("PKTEST-SYSTEMCTL-KEXEC")
        handoff = self.guest_times.get("starting_new_kernel")
        second = self.guest_times.get("second_up")
        if start is None or handoff is None or second is None:
            return None
        return handoff - start + second

    def arrival(self, word: str) -> float | None:
        """Host clock: when the first console line containing `word` arrived (seconds after
        QEMU started)."""
        return next((at for at, line in self.arrivals if word in line), None)

    def host_seconds_between(self, first: str, second: str) -> float | None:
        start, end = self.arrival(first), self.arrival(second)
        return None if start is None or end is None else end - start


@dataclasses.dataclass(frozen=True)
class SshAccess:
    """Mode ssh: root's key and the port on 127.0.0.1 that QEMU forwards to the guest's sshd."""

    port: int
    public_key: str  # "ssh-ed25519 AAAA... comment"

    @property
    def key_blob(self) -> str:
        kind, blob = self.public_key.split()[:2]
        if kind != "ssh-ed25519":
            raise ValueError(f"mode ssh takes an ed25519 key, not {kind}")
        return blob

    @property
    def qemu_args(self) -> list[str]:
        # Its own user netdev (restrict=on: the guest reaches nothing; the forward still
        # works), on a virtio-net of its own: the e1000e the missing-driver play keeps out
        # of the next kernel is not the one the play talks through.
        return [
            "-netdev",
            f"user,id=ssh0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device",
            f"virtio-net-pci,netdev=ssh0,romfile=,bus=pcie.0,addr=0xa,mac={SSH_MAC}",
        ]


def _kernel_append(mode: str, marker: str, root: str, ssh: SshAccess | None = None) -> str:
    words = [
        root,
        "rw",
        "console=ttyS0",
        "loglevel=7",  # the hook's info-level `petitkexec:` lines reach the console
        "panic=-1",
        f"pkmarker={marker}",
    ]
    words.append(f"pktest={mode}")
    if mode in ("hang", "hang-past-limit"):
        words.append(f"pkunprotect={VIRTFS_BDF}")
    if mode == "hang":
        words.append(f"pkunbindtimeout={HANG_UNBIND_TIMEOUT}")
        words.append(f"pktimelimit={HANG_TIME_LIMIT}")
    if mode == "hang-past-limit":
        words.append(f"pkunbindtimeout={PAST_LIMIT_UNBIND_TIMEOUT}")
        words.append(f"pktimelimit={PAST_LIMIT_TIME_LIMIT}")
    if mode == "missing-driver":
        words.append(f"pkkeepout={KEPT_OUT_MODULE}")
    if ssh is not None:
        words.append(f"pksshkey={ssh.key_blob}")
    return " ".join(words)


def boot_systemd(
    images: SystemdImages,
    *,
    mode: str = "kexec",
    timeout: float = 900,
    poweroff_grace: float = 60,
    echo: bool | None = None,
    extra_qemu_args: Sequence[str] = (),
    smp: int = SMP,
    ssh: SshAccess | None = None,
    while_running: Callable[[Path, str], None] | None = None,
) -> SystemdRun:
    """One QEMU run (q35, TCG, -no-reboot) of the systemd guest.

    mode "kexec": root on the virtio-blk disk (ext4, writes discarded with snapshot=on);
    mode "hang": root on virtio-9p (the image's tree under a private writable overlay), whose
    protection /etc/petitkexec.toml lifts: the hook's unbind of 00:09.0 hangs;
    mode "hang-past-limit": as "hang", with the unbind's deadline and the hook's time limit
    past systemd's 90 s hook limit: systemd's SIGTERM comes while the unbind hangs;
    mode "missing-driver": as "kexec", with module_blacklist=e1000e on the second kernel's
    command line (02:00.0 comes back without a driver: verify must fail);
    mode "ssh" (with `ssh`): as "kexec" but nothing happens by itself: each boot starts sshd
    (``PKTEST-SSH-READY``) and `while_running(log_path, marker)`, in a thread, drives the
    guest from the host; QEMU ends when the guest powers off (or at `timeout`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if (mode == "ssh") != (ssh is not None):
        raise ValueError("mode ssh, and only it, takes ssh=SshAccess(...)")
    echo = bool(os.environ.get("PETITKEXEC_VM_ECHO")) if echo is None else echo
    runs = cache() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old_log in sorted(runs.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-20]:
        old_log.unlink(missing_ok=True)
    marker = uuid.uuid4().hex[:12]
    work = Path(tempfile.mkdtemp(prefix=f"run-{marker}-", dir=runs))
    log_path = runs / f"{marker}.log"
    blank = work / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 << 20)
    qemu = shutil.which(guest.QEMU)
    if qemu is None:
        raise RuntimeError(f"{guest.QEMU} not found: see .ci/apt-packages")
    if mode in ("hang", "hang-past-limit"):
        root = f"root={VIRTFS_TAG} rootfstype=9p rootflags={NINEP_ROOTFLAGS}"
    else:
        root = "root=/dev/vda"
    args = [
        qemu,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "1G",
        "-smp",
        str(smp),
        "-nographic",
        "-no-reboot",
        "-serial",
        "mon:stdio",
        "-kernel",
        str(images.kernel),
        "-initrd",
        str(images.initrd),
        "-append",
        _kernel_append(mode, marker, root, ssh),
        "-drive",
        f"if=none,id=rootdisk,file={images.disk},format=raw,snapshot=on",
        "-drive",
        f"if=none,id=blankdisk,file={blank},format=raw",
    ]
    for option in TOPOLOGY:
        args += option.split(" ", 1)
    command = args
    if mode in ("hang", "hang-past-limit"):
        merged = work / "merged"
        for name in ("upper", "overlay-work", "merged"):
            (work / name).mkdir()
        args += [
            "-fsdev",
            f"local,id=fsroot,path={merged},security_model=passthrough",
            "-device",
            f"virtio-9p-pci,fsdev=fsroot,mount_tag={VIRTFS_TAG},bus=pcie.0,addr=0x9",
        ]
        # The overlay lives in a private mount namespace that ends with QEMU (sh execs it).
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4" && '
            'shift 4 && exec "$@"',
            "sh",
            str(images.tree),
            str(work / "upper"),
            str(work / "overlay-work"),
            str(merged),
            *args,
        ]
    if ssh is not None:
        args += ssh.qemu_args
    command += list(extra_qemu_args)
    driver = None
    if while_running is not None:
        driver = threading.Thread(target=while_running, args=(log_path, marker), daemon=True)
        driver.start()

    finished = guest.run_qemu(
        command,
        log_path,
        timeout=timeout,
        poweroff_grace=poweroff_grace,
        echo=echo,
        poll_s=0.2,
    )
    if driver is not None:
        driver.join(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
    return SystemdRun.from_qemu(
        finished,
        marker=marker,
        log_path=log_path,
        args=command,
        mode=mode,
        arrivals=finished.lines,
    )


def main(argv: Sequence[str]) -> int:
    """python -m tests.vm.systemd_guest [--force] [kexec|hang|missing-driver]: build, then
    boot once per mode."""
    force = "--force" in argv
    modes = [a for a in argv if not a.startswith("-")]
    images = build(force=force)
    print(json.dumps(images.info, indent=1))
    for mode in modes:
        result = boot_systemd(images, mode=mode, echo=True)
        print(
            f"\n{mode}: wall {result.wall_seconds:.1f}s, qemu exit {result.qemu_returncode}, "
            f"timed out {result.timed_out}, log {result.log_path}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
