"""What each lane's guest images are made of, and where they are cached.

A `Lane` is data only: how images are made is the same for every lane (build.py). `X86` is
the q35 lane's; powernv.py defines the PowerNV lane's from the same `BASE_PACKAGES`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

# Packages wanted for what they ship; the library packages they depend on are added by
# following Depends/Pre-Depends into lib* packages (see debs.fetch_packages). Every lane's
# guest has the BASE_PACKAGES; the q35 lane's has more.
BASE_PACKAGES = (
    "libc6",
    "libc-bin",  # /sbin/ldconfig, for the one scenario that runs with it (and PowerNV's /init)
    "busybox-static",
    "kexec-tools",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libudev1",
)
ROOT_PACKAGES = (
    *BASE_PACKAGES,
    "umockdev",
    "libumockdev0",
    "udev",  # only its udevadm binary: umockdev-record runs `udevadm info`
    "nvme-cli",
    "nbd-client",  # busybox-static 1.35 in Debian 12 has no nbd-client applet
)
# Modules loaded (in dependency order) by both guest kernels. pcieport and shpchp are built in.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_net",
    "virtio_rng",
    "nvme",
    "crc64_rocksoft_generic",
    "crct10dif_generic",
    "e1000e",
    "e1000",
    "xhci_pci",
    "ahci",
    "sd_mod",
    "9pnet_virtio",
    "9p",
    "crc32c_generic",
    "ext4",
    # A network block device: both kernels connect one in tests/vm/test_storage_guest.py.
    "nbd",
    # For devices some tests add: vfio-pci (bound by hand; its IOMMU backend, as vfio loads
    # it on demand) and the i6300esb watchdog.
    "vfio_pci",
    "vfio_iommu_type1",
    "i6300esb",
)


def cache_dir() -> Path:
    return Path(os.environ.get("PETITKEXEC_VM_CACHE") or REPO_ROOT / ".cache" / "vm")


@dataclasses.dataclass(frozen=True)
class Lane:
    """What one lane's guest images are made of. How they are made is the same for every lane."""

    name: str
    arch: str  # Debian's architecture name
    triplet: str  # the multiarch library directory
    dynamic_loader: str
    kernel_flavour: str  # the kernel comes from linux-image-<flavour>
    kernel_file: str  # the kernel's name in /boot (<name>-<version>) and in build-<key>/
    root_packages: tuple[str, ...]
    guest_modules: tuple[str, ...]  # loaded by both kernels, with their dependencies
    cache_subdir: str = ""  # below cache_dir()
    # More for stage 1: scripts from guest/ (in /usr/bin), binaries with their libraries, links.
    stage1_scripts: tuple[str, ...] = ()
    stage1_programs: tuple[str, ...] = ()
    stage1_links: tuple[tuple[str, str], ...] = ()
    # Binaries, with their libraries, the second kernel's initramfs has too (else busybox only).
    second_programs: tuple[str, ...] = ()
    # None: the host runs the guest's busybox and ldconfig (applets linked and ld cache built
    # here). Otherwise this /init does both at boot, then runs the common init (/etc/pk-init).
    boot_init: Path | None = None
    # None: the host's apt, whose lists the host keeps fresh (.ci/run). Otherwise the
    # environment of a private APT_CONFIG, and how to refresh its lists (force, else if stale).
    apt_env: Callable[[], dict[str, str]] | None = None
    update_lists: Callable[[bool], None] | None = None
    sources: tuple[Path, ...] = ()  # more files (or folders) that shape the base images

    def cache(self) -> Path:
        return cache_dir() / self.cache_subdir

    @property
    def lib_dirs(self) -> tuple[str, ...]:
        return (f"lib/{self.triplet}", f"usr/lib/{self.triplet}", "lib64", "lib", "usr/lib")


X86 = Lane(
    name="x86",
    arch="amd64",
    triplet="x86_64-linux-gnu",
    dynamic_loader="lib64/ld-linux-x86-64.so.2",
    kernel_flavour="amd64",
    kernel_file="vmlinuz",
    root_packages=ROOT_PACKAGES,
    guest_modules=GUEST_MODULES,
    stage1_scripts=("setup-sriov",),
    # umockdev-record runs `udevadm info`; nvme-cli and nbd-client for the scenarios.
    stage1_programs=("usr/bin/umockdev-record", "bin/udevadm", "usr/sbin/nvme", "sbin/nbd-client"),
    stage1_links=(("usr/bin/udevadm", "/bin/udevadm"),),
    # The second kernel reconnects the NBD disk the first one wrote to, to read it back.
    second_programs=("sbin/nbd-client",),
)
