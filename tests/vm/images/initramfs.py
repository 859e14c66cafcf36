"""The two base initramfs images: stage 1 (everything but petitkexec) and the second kernel's.

Each is a sequence of named steps on a `RootBuilder`, composed in one function, then written
as a cpio: `build_second` is busybox, the guest scripts and the modules; `build_stage1` adds
kexec, Python, the lane's programs and both kernels' files to that.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .cpio import CONSOLE, write_cpio
from .lanes import Lane
from .python import compile_tree, install_python
from .rootfs import RootBuilder
from .run import ImageError, run

GUEST_SCRIPTS = Path(__file__).resolve().parents[1] / "guest"


def install_busybox(rb: RootBuilder) -> None:
    rb.add("bin/busybox")
    if rb.lane.boot_init is not None:  # it links the applets at boot
        rb.symlink("bin/sh", "busybox")
        return
    applets = run([str(rb.pkgroot / "bin/busybox"), "--list-full"]).stdout.split()
    for applet in applets:
        rb.symlink(applet, "/bin/busybox")


def install_guest_scripts(rb: RootBuilder, init: str) -> None:
    """The guest scripts, with `init` (init-stage1 or init-second) as /init or, behind the
    lane's boot_init, as /etc/pk-init."""
    if rb.lane.boot_init is None:
        rb.write("init", (GUEST_SCRIPTS / init).read_text(), 0o755)
    else:
        rb.write("etc/pk-init", (GUEST_SCRIPTS / init).read_text(), 0o755)
        rb.write("init", rb.lane.boot_init.read_text(), 0o755)
    rb.write("etc/pk-lib.sh", (GUEST_SCRIPTS / "lib.sh").read_text())
    rb.write("usr/bin/readback", (GUEST_SCRIPTS / "readback").read_text(), 0o755)
    rb.write("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    rb.write("etc/group", "root:x:0:\n")


def install_modules(rb: RootBuilder, kver: str, modules: list[str], modules_dir: Path) -> None:
    """The modules (in load order, as /etc/modules.load lists them) and the modules.* indexes."""
    rb.write("etc/modules.load", "\n".join(modules) + "\n")
    dest = rb.root / "lib/modules" / kver
    dest.mkdir(parents=True, exist_ok=True)
    for name in modules_dir.iterdir():
        if name.is_file() and name.name.startswith("modules."):
            shutil.copy2(name, dest / name.name)
    for ko in modules:
        (dest / ko).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(modules_dir / ko, dest / ko)


def install_ld_cache(rb: RootBuilder) -> None:
    """ld.so.conf, and the ld cache when the host can build it (else the lane's boot_init)."""
    triplet = rb.lane.triplet
    rb.write("etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    rb.write(f"etc/ld.so.conf.d/{triplet}.conf", f"/lib/{triplet}\n/usr/lib/{triplet}\n")
    if rb.lane.boot_init is not None:
        return
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    run([ldconfig, "-r", str(rb.root)])
    if not (rb.root / "etc/ld.so.cache").exists():
        raise ImageError("ldconfig -r wrote no ld.so.cache")


def build_second(
    lane: Lane, pkgroot: Path, build: Path, kver: str, modules: list[str], modules_dir: Path
) -> Path:
    rb = RootBuilder(pkgroot, build / "second-root", lane)
    install_busybox(rb)
    install_guest_scripts(rb, "init-second")
    install_modules(rb, kver, modules, modules_dir)
    if lane.second_programs:
        rb.add_elf_closure(*lane.second_programs)
        install_ld_cache(rb)
    out = write_cpio(rb.root, build / "second-base.cpio.gz", nodes=[CONSOLE], level=9)
    shutil.rmtree(rb.root)
    return out


def build_stage1(
    lane: Lane,
    pkgroot: Path,
    build: Path,
    kver: str,
    modules: list[str],
    modules_dir: Path,
    kernel: Path,
    second: Path,
) -> Path:
    rb = RootBuilder(pkgroot, build / "stage1-root", lane)
    install_busybox(rb)
    install_guest_scripts(rb, "init-stage1")
    install_modules(rb, kver, modules, modules_dir)
    rb.write("usr/sbin/kexec-readback", (GUEST_SCRIPTS / "kexec-readback").read_text(), 0o755)
    for script in lane.stage1_scripts:
        rb.write(f"usr/bin/{script}", (GUEST_SCRIPTS / script).read_text(), 0o755)
    rb.add_elf_closure("sbin/kexec")
    rb.symlink("usr/sbin/kexec", "/sbin/kexec")
    install_python(rb)
    # Like a firmware image, no ldconfig binary: pyudev's ctypes.util.find_library("udev")
    # (`/sbin/ldconfig -p`) finds nothing, and petitkexec must load libudev by its soname.
    # One scenario adds it back, as distributions have it. A lane whose /init builds the ld
    # cache at boot (boot_init) needs it there.
    rb.add_elf_closure(f"usr/lib/{lane.triplet}/libudev.so.1")
    if lane.boot_init is not None:
        rb.add_elf_closure("sbin/ldconfig")
    if lane.stage1_programs:
        rb.add_elf_closure(*lane.stage1_programs)
    for link, target in lane.stage1_links:
        rb.symlink(link, target)
    shutil.copy2(kernel, rb.root / "boot/vmlinuz")  # the name the guest scripts load
    shutil.copy2(second, rb.root / "boot/second-base.cpio.gz")
    install_ld_cache(rb)
    compile_tree(rb.root, "usr/lib/python3.11")
    out = write_cpio(rb.root, build / "stage1-base.cpio.gz", nodes=[CONSOLE], level=6)
    shutil.rmtree(rb.root)
    return out
