"""The slow test driver (tests/vm/slowdev/, GPL) built for the q35 guest's kernel.

Built into the git-ignored cache (never committed) against Debian's headers for exactly the
kernel the images fetched: `apt-get download` of linux-headers-<kver>, its -common part and
linux-kbuild-6.1 at the kernel package's version, unpacked with `dpkg-deb -x` (nothing is
installed on the host), then kbuild's `make M=...` with the host's gcc (Debian 12's gcc-12,
the compiler Debian built that kernel with).

    python -m tests.vm.slowdev_module      # build (or reuse) and print the .ko's path
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from pathlib import Path

from tests.vm.images.build import Images, current_images
from tests.vm.images.lanes import X86
from tests.vm.images.run import ImageError, log, run

SOURCE = Path(__file__).resolve().parent / "slowdev"
MODULE = "petitkexec_slowdev"
IN_GUEST = f"lib/modules/extra/{MODULE}.ko"  # where a run's layer puts it (extra_files)


def _header_packages(images: Images) -> list[str]:
    """name=version of the headers matching the images' kernel package."""
    debs = images.info["packages"]
    kernel_deb = next(d for d in debs if d.startswith(images.kernel_package + "_"))
    version = kernel_deb.split("_")[1].replace("%3a", ":")
    kver = images.kernel_version  # 6.1.0-57-amd64
    common = kver.rsplit("-", 1)[0] + "-common"
    series = ".".join(kver.split(".")[:2])  # 6.1
    return [
        f"linux-headers-{kver}={version}",
        f"linux-headers-{common}={version}",
        f"linux-kbuild-{series}={version}",
    ]


def _headers_tree(images: Images, cache: Path) -> Path:
    root = cache / f"headers-{images.kernel_version}"
    tree = root / "usr/src" / f"linux-headers-{images.kernel_version}"
    if (root / ".unpacked").exists():
        return tree
    shutil.rmtree(root, ignore_errors=True)
    debs = cache / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    wanted = _header_packages(images)
    got = run(["apt-get", "download", *wanted], cwd=debs, check=False)
    if got.returncode != 0:
        raise ImageError(f"apt-get download {' '.join(wanted)} failed:\n{got.stderr}")
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(root)])
    makefile = tree / "Makefile"
    if not makefile.exists():
        raise ImageError(f"no kernel headers at {tree}")
    # Debian's flavour Makefile includes the -common one by its installed path, /usr/src/...:
    # point it into this unpacked tree instead.
    makefile.write_text(makefile.read_text().replace(" /usr/src/", f" {root}/usr/src/"))
    (root / ".unpacked").write_text("\n".join(wanted))
    return tree


def build_module(images: Images | None = None) -> Path:
    """The .ko for the images' kernel, rebuilt when its source or the kernel changes."""
    images = images or current_images(X86)
    cache = X86.cache() / "slowdev"
    digest = hashlib.sha256(images.kernel_version.encode())
    for path in sorted(SOURCE.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    ko = cache / f"{MODULE}-{digest.hexdigest()[:12]}.ko"
    if ko.exists():
        return ko
    started = time.monotonic()
    tree = _headers_tree(images, cache)
    build = cache / "build"
    shutil.rmtree(build, ignore_errors=True)
    shutil.copytree(SOURCE, build)
    made = run(["make", "-C", str(tree), f"M={build}", "modules"], check=False)
    built = build / f"{MODULE}.ko"
    if made.returncode != 0 or not built.exists():
        raise ImageError(f"building {MODULE} failed:\n{made.stdout}\n{made.stderr}")
    vermagic = run(["modinfo", "-F", "vermagic", str(built)]).stdout
    if not re.match(rf"{re.escape(images.kernel_version)}\s", vermagic):
        raise ImageError(f"{MODULE}.ko vermagic {vermagic!r} is not {images.kernel_version}")
    for old in cache.glob(f"{MODULE}-*.ko"):
        old.unlink()
    shutil.copy2(built, ko)
    log(f"built {ko.name} in {time.monotonic() - started:.1f}s")
    return ko


# Free pcie.0 slots for edu devices: 0x09 is the 9p share, 0x0a a root port, 0x0b the i6300esb.
EDU_SLOTS = range(0x0C, 0x1C)


def edu_bdf(n: int) -> str:
    return f"0000:00:{EDU_SLOTS[n]:02x}.0"


def edu_qemu_args(count: int) -> list[str]:
    """`count` edu devices (conventional PCI) on the root bus, from 00:0c.0 on."""
    if count > len(EDU_SLOTS):
        raise ValueError(f"at most {len(EDU_SLOTS)} edu devices")
    return [
        arg for n in range(count) for arg in ("-device", f"edu,bus=pcie.0,addr={EDU_SLOTS[n]:#x}")
    ]


def load_lines(count: int, *, remove_ms: int, shutdown_ms: int, **bdfs: str) -> str:
    """Stage-1 shell lines: insmod the driver (hang_remove=/sloppy_remove= a BDF), then check
    that it bound all `count` edu devices (SLOWDEV-BOUND n)."""
    options = " ".join(f"{name}={bdf}" for name, bdf in bdfs.items())
    return (
        f"insmod /{IN_GUEST} remove_ms={remove_ms} shutdown_ms={shutdown_ms} {options}\n"
        f"set -- /sys/bus/pci/drivers/{MODULE}/0000:*\n"
        'echo "SLOWDEV-BOUND $#"\n'
        f'[ "$#" -eq {count} ] || {{ echo SCENARIO-SLOWDEV-MISSING; exit 9; }}\n'
    )


if __name__ == "__main__":
    print(build_module())
