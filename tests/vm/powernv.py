"""The PowerNV (OpenPOWER bare metal) guest of the real-kernel lane: Debian's ppc64el 6.1
kernel on QEMU's `powernv9` machine (skiboot/OPAL, six PHB4s), under TCG.

    python -m tests.vm.powernv [--force]       # build/refresh the images (.cache/vm/powernv/)
    run = boot_powernv("petitkexec plan")      # -> tests.vm.guest.GuestRun

Everything is built and booted by the q35 lane's code: `LANE` tells tests/vm/images/ what its
images are made of, `POWERNV9` tells guest.boot() what the machine is; the guest scripts in
tests/vm/guest/ run unchanged (stage 1 and the second kernel print the same lines). What
differs lives here:

- packages come from a private APT configuration (``apt/``: APT_CONFIG with ppc64el as the
  only architecture, the host's Debian sources, its own lists and an empty dpkg status), so
  the host's dpkg never learns about ppc64el;
- the ppc64el busybox cannot run on the build host: tests/vm/guest-powernv/init links its
  applets at boot, removes ldconfig (the image has neither it nor an ld cache, as a firmware
  image), then runs the common init;
- the kernel is an ELF ``vmlinux`` (no KEXEC_FILE: stage 1's ``kexec -l`` is what works); it
  sits at /boot/vmlinuz in the guest because that is the name the common scripts use;
- the stage-1 image has neither umockdev nor nvme-cli nor setup-sriov;
- the console is hvc0 (OPAL), also on the second kernel's command line;
- one device per PHB: each PHB4 is its own PCI domain with one root port (1014:04c1) whose
  secondary bus QEMU calls pcie.N (PHB 4's is free: `virtfs_dir` puts a virtio-9p share
  there). No `-nodefaults`: it removes the PHBs.

Cache layout under ``<repo>/.cache/vm/powernv/``: ``apt/`` (config and lists), ``debs/``,
``pkgroot/``, ``build-<key>/`` (vmlinux, stage-1 and second-kernel bases, dependency layer),
``session/`` (petitkexec from the working tree, once per process), ``runs/`` (serial logs):
the q35 lane's layout, one folder down; and ``zipapp-wheels/`` (the pinned wheels of the
zipapp test_powernv.py builds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python tests/vm/powernv.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.vm"

from . import guest
from .images import build, debs
from .images.lanes import BASE_PACKAGES, Lane

HERE = Path(__file__).resolve().parent
POWERNV_SCRIPTS = HERE / "guest-powernv"

QEMU = "qemu-system-ppc64"
MACHINE = "powernv9"
MEMORY = "2G"
ARCH = "ppc64el"
ROOT_PACKAGES = BASE_PACKAGES
# Loaded in dependency order by both kernels (all of them are modules in Debian's ppc64el
# kernel; nvme needs the two crc modules first).
GUEST_MODULES = (
    "crc64_rocksoft_generic",
    "crct10dif_generic",
    "nvme",
    "e1000e",
    "virtio_pci",
    "virtio_net",
    "virtio_rng",
    "xhci_pci",
    "9pnet_virtio",  # for a virtio-9p share (virtfs_dir)
    "9p",
)
CONSOLE = "hvc0"

# One device per PHB4 root port (pcie.N is the secondary bus of PHB N's root port, addr 0),
# and on PHB 5 a PCIe switch with a virtio-rng below its downstream port.
TOPOLOGY: tuple[str, ...] = (
    "-netdev user,id=n0,restrict=on",
    "-device e1000e,bus=pcie.0,addr=0x0,netdev=n0,romfile=,mac=52:54:00:00:01:10",
    "-device nvme,bus=pcie.1,addr=0x0,serial=pkxpnv01,drive=nvmedisk",
    "-netdev user,id=n1,restrict=on",
    "-device virtio-net-pci,bus=pcie.2,addr=0x0,netdev=n1,romfile=,mac=52:54:00:00:01:11",
    "-device qemu-xhci,bus=pcie.3,addr=0x0",
    "-device x3130-upstream,id=up0,bus=pcie.5,addr=0x0",
    "-device xio3130-downstream,id=dn0,bus=up0,chassis=1,slot=1",
    "-device virtio-rng-pci,bus=dn0,addr=0x0",
)

# What the guest shows once every driver has probed: one PCI domain per PHB, the root port
# at 00:00.0 of each, never a driver on a bridge (no pcieport on PowerNV).
ROOT_PORTS = tuple(f"{domain:04x}:00:00.0" for domain in range(6))
E1000E, NVME, VIRTIO_NET, XHCI = (
    "0000:01:00.0",
    "0001:01:00.0",
    "0002:01:00.0",
    "0003:01:00.0",
)
SWITCH_UP, SWITCH_DOWN, VIRTIO_RNG = "0005:01:00.0", "0005:02:00.0", "0005:03:00.0"
# boot_powernv(virtfs_dir=...): a virtio-9p share below PHB 4's root port, the one free slot.
VIRTFS_BUS, VIRTFS_BDF = "pcie.4", "0004:01:00.0"
EXPECTED_DRIVERS: dict[str, str | None] = {
    **dict.fromkeys(ROOT_PORTS),
    E1000E: "e1000e",
    NVME: "nvme",
    VIRTIO_NET: "virtio-pci",
    XHCI: "xhci_hcd",
    SWITCH_UP: None,
    SWITCH_DOWN: None,
    VIRTIO_RNG: "virtio-pci",
}


def log(message: str) -> None:
    print(f"[vm-powernv] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return LANE.cache()


# --------------------------------------------------------------------------- packages


def _host_source_stanzas() -> list[dict[str, str]]:
    """The host's enabled `deb` sources (deb822 .sources and one-line .list files)."""
    stanzas: list[dict[str, str]] = []
    etc = Path("/etc/apt")
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            key = None
            for line in block.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                if line[0] in " \t" and key:
                    fields[key] += " " + line.strip()
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                stanzas.append(fields)
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[(?P<opts>[^]]*)\]\s+)?(?P<rest>.+)$", line.strip())
            if not match:
                continue
            uri, suite, *components = match["rest"].split()
            options = dict(o.split("=", 1) for o in (match["opts"] or "").split() if "=" in o)
            stanza = {"uris": uri, "suites": suite, "components": " ".join(components)}
            if "arch" in options:
                stanza["architectures"] = options["arch"].replace(",", " ")
            if "signed-by" in options:
                stanza["signed-by"] = options["signed-by"]
            stanzas.append(stanza)
    return [
        s for s in stanzas if "architectures" not in s or ARCH in s["architectures"].split()
    ] or [
        {
            "uris": "http://deb.debian.org/debian",
            "suites": "bookworm bookworm-updates",
            "components": "main",
            "signed-by": "/usr/share/keyrings/debian-archive-keyring.gpg",
        }
    ]


def apt_environment() -> dict[str, str]:
    """Environment for apt-get/apt-cache that sees ppc64el packages only (the host's dpkg
    state untouched): a private APT_CONFIG with its own sources, lists, status and cache."""
    apt = cache_dir() / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    (apt / "sources.list").touch()
    sources = "\n".join(
        "Types: deb\n"
        f"URIs: {s['uris']}\nSuites: {s['suites']}\nComponents: {s['components']}\n"
        f"Architectures: {ARCH}\n"
        # A keyring path carries over; an inline key block does not (apt's trusted.gpg.d then).
        + (f"Signed-By: {s['signed-by']}\n" if s.get("signed-by", "").startswith("/") else "")
        for s in _host_source_stanzas()
    )
    _write_if_changed(apt / "sources.list.d" / "host.sources", sources)
    config = (
        f'APT::Architecture "{ARCH}";\n'
        f'APT::Architectures {{ "{ARCH}"; }};\n'
        f'Dir::Etc::SourceList "{apt}/sources.list";\n'
        f'Dir::Etc::SourceParts "{apt}/sources.list.d";\n'
        f'Dir::State::Lists "{apt}/lists";\n'
        f'Dir::State::status "{apt}/status";\n'
        f'Dir::Cache "{apt}/cache";\n'
        'Acquire::Languages "none";\n'
    )
    _write_if_changed(apt / "apt.conf", config)
    return {**os.environ, "APT_CONFIG": str(apt / "apt.conf")}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def apt_update() -> None:
    """Refresh the private lists. An index that fails (a mirror mid-sync) is ignored by
    apt and logged here: the others still resolve the packages."""
    proc = debs.apt(LANE, ["apt-get", "update", "-q"])
    problems = [
        line
        for line in proc.stdout.splitlines() + proc.stderr.splitlines()
        if line[:2] in ("E:", "W:") or line.startswith("Err:")
    ]
    for line in problems:
        log(f"apt-get update ({ARCH}): {line}")
    (cache_dir() / "apt" / "updated").write_text(time.ctime())


def update_lists(force: bool) -> None:
    """apt_update() when forced or when the lists are older than a day. debs.py asks only
    when the package manifest is missing or out of date (the lane's packages stay pinned)."""
    stamp = cache_dir() / "apt" / "updated"
    if force or not stamp.exists() or time.time() - stamp.stat().st_mtime > 86400:
        apt_update()


# --------------------------------------------------------------------------- lane and machine


LANE = Lane(
    name="powernv",
    arch=ARCH,
    triplet="powerpc64le-linux-gnu",
    dynamic_loader="lib64/ld64.so.2",
    kernel_flavour="powerpc64le",
    kernel_file="vmlinux",
    root_packages=ROOT_PACKAGES,
    guest_modules=GUEST_MODULES,
    cache_subdir="powernv",
    boot_init=POWERNV_SCRIPTS / "init",
    apt_env=apt_environment,
    update_lists=update_lists,
    sources=(Path(__file__).resolve(), POWERNV_SCRIPTS),
)
POWERNV9 = guest.Machine(
    lane=LANE,
    qemu=QEMU,
    machine=MACHINE,
    memory=MEMORY,
    console=CONSOLE,
    topology=TOPOLOGY,
    second_console=True,
    timeout=300,
    keep_logs=50,
)


def build_images(*, force: bool = False, project: bool = True) -> build.Images:
    return build.build_images(force=force, project=project, lane=LANE)


def current_images() -> build.Images:
    """Built once per process; the petitkexec layer fresh from the working tree."""
    return build.current_images(LANE)


def boot_powernv(
    scenario: str, *, virtfs_dir: Path | None = None, **options: Any
) -> guest.GuestRun:
    """guest.boot() on the powernv9 machine: same scenario contract and options (timeout 300 s
    by default), same GuestRun. virtfs_dir: shared as virtio-9p at VIRTFS_BDF (tag "host0");
    mount it with `mount -t 9p -o trans=virtio,version=9p2000.L host0 /mnt`."""
    share: list[str] = []
    if virtfs_dir is not None:
        share = [
            "-fsdev",
            f"local,id=fs0,path={virtfs_dir},security_model=none",
            "-device",
            f"virtio-9p-pci,fsdev=fs0,mount_tag={guest.VIRTFS_TAG},bus={VIRTFS_BUS},addr=0x0",
        ]
    extra = [*share, *options.pop("extra_qemu_args", ())]
    return guest.boot(
        POWERNV9, scenario, extra_qemu_args=extra, virtfs=virtfs_dir is not None, **options
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild the cached images too")
    parser.add_argument("--boot", metavar="SCENARIO", help="then boot with this scenario")
    args = parser.parse_args(argv)
    images = build_images(force=args.force)
    result = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in dataclasses.asdict(images).items()
        if k != "info"
    }
    print("\n".join(f"{k}: {v}" for k, v in result.items()))
    if args.boot:
        run = boot_powernv(args.boot, images=images, echo=True)
        print(f"wall {run.wall_seconds:.1f}s second_up={run.second_up} log={run.log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
