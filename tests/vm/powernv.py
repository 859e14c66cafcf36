"""The PowerNV (OpenPOWER bare metal) guest of the real-kernel lane: Debian's ppc64el 6.1
kernel on QEMU's `powernv9` machine (skiboot/OPAL, six PHB4s), under TCG.

    python -m tests.vm.powernv [--force]       # build/refresh the images (.cache/vm/powernv/)
    run = boot_powernv("petitkexec plan")      # -> tests.vm.guest.GuestRun

It reuses the q35 lane wherever the architecture does not matter: image.py's package
unpacking, module ordering, ELF closure, Python install, cpio writer and petitkexec layers;
guest.py's run layer, serial reader and log parsing; the guest scripts in tests/vm/guest/
unchanged (stage 1 and the second kernel print the same lines). What differs lives here:

- packages come from a private APT configuration (``apt/``: APT_CONFIG with ppc64el as the
  only architecture, the host's Debian sources, its own lists and an empty dpkg status), so
  the host's dpkg never learns about ppc64el;
- the ppc64el busybox and ldconfig cannot run on the build host: tests/vm/guest-powernv/init
  links the applets and builds the ld cache at boot, then runs the common init;
- the kernel is an ELF ``vmlinux`` (no KEXEC_FILE: stage 1's ``kexec -l`` is what works); it
  sits at /boot/vmlinuz in the guest because that is the name the common scripts use;
- the console is hvc0 (OPAL), also on the second kernel's command line;
- one device per PHB: each PHB4 is its own PCI domain with one root port (1014:04c1) whose
  secondary bus QEMU calls pcie.N. No `-nodefaults`: it removes the PHBs.

Cache layout under ``<repo>/.cache/vm/powernv/``: ``apt/`` (config and lists), ``debs/``,
``pkgroot/``, ``build-<key>/`` (vmlinux, stage-1 and second-kernel bases, dependency layer),
``session/`` (petitkexec from the working tree, once per process), ``runs/`` (serial logs).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python tests/vm/powernv.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.vm"

from . import guest, image

HERE = Path(__file__).resolve().parent
POWERNV_SCRIPTS = HERE / "guest-powernv"

QEMU = "qemu-system-ppc64"
MACHINE = "powernv9"
MEMORY = "2G"
ARCH = "ppc64el"
TRIPLET = "powerpc64le-linux-gnu"
KERNEL_META_PACKAGE = "linux-image-powerpc64le"
DYNAMIC_LOADER = "lib64/ld64.so.2"
LIB_DIRS = (f"lib/{TRIPLET}", f"usr/lib/{TRIPLET}", "lib64", "lib", "usr/lib")
ROOT_PACKAGES = (
    "libc6",
    "libc-bin",  # the guest's own ldconfig (see guest-powernv/init)
    "busybox-static",
    "kexec-tools",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libudev1",
)
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
)
KEEP_LOGS = 50
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
    return image.cache_dir() / "powernv"


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


def _apt(args: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=apt_environment(),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def apt_update() -> None:
    """Refresh the private lists. An index that fails (a mirror mid-sync) is ignored by
    apt and logged here: the others still resolve the packages."""
    proc = _apt(["apt-get", "update", "-q"])
    problems = [
        line
        for line in proc.stdout.splitlines() + proc.stderr.splitlines()
        if line[:2] in ("E:", "W:") or line.startswith("Err:")
    ]
    for line in problems:
        log(f"apt-get update ({ARCH}): {line}")
    (cache_dir() / "apt" / "updated").write_text(time.ctime())


def kernel_package() -> str:
    """linux-image-6.1.*-powerpc64le, as the meta package names it. Asked only when the
    package manifest is missing or out of date; lists older than a day are refreshed first."""
    stamp = cache_dir() / "apt" / "updated"
    for attempt in range(2):
        if attempt or not stamp.exists() or time.time() - stamp.stat().st_mtime > 86400:
            apt_update()
        out = _apt(["apt-cache", "depends", KERNEL_META_PACKAGE]).stdout
        names = re.findall(r"Depends:\s*(linux-image-\S+-powerpc64le)", out)
        if names:
            return str(names[0])
    raise image.ImageError(f"apt-cache depends {KERNEL_META_PACKAGE} ({ARCH}) names no kernel")


def _download(names: Iterable[str], debs: Path, roots: Sequence[str]) -> None:
    names = sorted(set(names))
    if not names or _apt(["apt-get", "download", *names], cwd=debs).returncode == 0:
        return
    for name in names:  # one unknown (virtual) name fails the batch
        one = _apt(["apt-get", "download", name], cwd=debs)
        if one.returncode != 0:
            if name in roots:
                raise image.ImageError(f"apt-get download {name} ({ARCH}) failed:\n{one.stderr}")
            log(f"skipping dependency {name}: {one.stderr.strip().splitlines()[-1:]}")


def fetch_packages(debs: Path) -> dict[str, Path]:
    """image.fetch_packages for ppc64el: the roots and their library closure, pinned by a
    manifest so later runs do not ask apt at all."""
    debs.mkdir(parents=True, exist_ok=True)
    manifest_path = debs / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("root_packages") == list(ROOT_PACKAGES) and all(
            (debs / f).exists() for f in manifest["packages"].values()
        ):
            return {name: debs / f for name, f in manifest["packages"].items()}
    started = time.monotonic()
    roots = [kernel_package(), *ROOT_PACKAGES]
    for stale in debs.glob("*.deb"):
        stale.unlink()
    have: dict[str, Path] = {}
    asked: set[str] = set()
    todo = set(roots)
    while todo:
        _download(todo, debs, roots)
        asked |= todo
        for deb in debs.glob("*.deb"):
            have.setdefault(deb.name.split("_", 1)[0], deb)
        new: set[str] = set()
        for name in todo & set(have):
            for field in ("Pre-Depends", "Depends"):
                new.update(image._parse_depends(image._deb_field(have[name], field)))
        todo = new - set(have) - asked
    packages = {name: deb.name for name, deb in sorted(have.items())}
    manifest_path.write_text(
        json.dumps(
            {"root_packages": list(ROOT_PACKAGES), "roots": roots, "packages": packages}, indent=1
        )
    )
    log(f"downloaded {len(packages)} {ARCH} packages in {time.monotonic() - started:.1f}s")
    return {name: debs / f for name, f in packages.items()}


# --------------------------------------------------------------------------- guest roots


class PowerRootBuilder(image.RootBuilder):
    """image.RootBuilder with ppc64el's library directories and dynamic loader."""

    def __init__(self, pkgroot: Path, root: Path) -> None:
        super().__init__(pkgroot, root)
        (root / "lib/x86_64-linux-gnu").rmdir()
        (root / "lib" / TRIPLET).mkdir(parents=True, exist_ok=True)

    def find_library(self, soname: str) -> str:
        for d in LIB_DIRS:
            if (self.pkgroot / d / soname).exists():
                return f"{d}/{soname}"
        raise image.ImageError(f"library {soname} is in no downloaded {ARCH} package")

    def add_elf_closure(self, *rels: str) -> None:
        todo = [r.lstrip("/") for r in rels]
        todo.append(DYNAMIC_LOADER)
        seen: set[str] = set()
        while todo:
            rel = todo.pop()
            if rel in seen:
                continue
            seen.add(rel)
            real = self.add(rel)
            todo.extend(self.find_library(soname) for soname in image.elf_needed(self.root / real))


def _install_common(
    rb: PowerRootBuilder, common_init: str, kver: str, modules: list[str], modules_dir: Path
) -> None:
    """busybox, the lane's guest scripts with `common_init` behind guest-powernv/init."""
    rb.add("bin/busybox")
    rb.symlink("bin/sh", "busybox")
    image._install_guest_scripts(rb, common_init, kver, modules, modules_dir)
    (rb.root / "init").rename(rb.root / "etc/pk-init")
    rb.write("init", (POWERNV_SCRIPTS / "init").read_text(), 0o755)


def _build_second(
    pkgroot: Path, build: Path, kver: str, modules: list[str], modules_dir: Path
) -> Path:
    rb = PowerRootBuilder(pkgroot, build / "second-root")
    _install_common(rb, "init-second", kver, modules, modules_dir)
    out = image.write_cpio(rb.root, build / "second-base.cpio.gz", nodes=[image.CONSOLE], level=9)
    shutil.rmtree(rb.root)
    return out


def _build_stage1(
    pkgroot: Path,
    build: Path,
    kver: str,
    modules: list[str],
    modules_dir: Path,
    vmlinux: Path,
    second: Path,
) -> Path:
    rb = PowerRootBuilder(pkgroot, build / "stage1-root")
    _install_common(rb, "init-stage1", kver, modules, modules_dir)
    kexec_readback = (image.GUEST_SCRIPTS / "kexec-readback").read_text()
    rb.write("usr/sbin/kexec-readback", kexec_readback, 0o755)
    rb.add_elf_closure("sbin/kexec", "sbin/ldconfig", f"usr/lib/{TRIPLET}/libudev.so.1")
    rb.symlink("usr/sbin/kexec", "/sbin/kexec")
    image._install_python(rb)
    shutil.rmtree(rb.root / f"usr/lib/python3.11/config-3.11-{TRIPLET}", ignore_errors=True)
    rb.write("etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    rb.write(f"etc/ld.so.conf.d/{TRIPLET}.conf", f"/lib/{TRIPLET}\n/usr/lib/{TRIPLET}\n")
    shutil.copy2(vmlinux, rb.root / "boot/vmlinuz")  # the name the common scripts load
    shutil.copy2(second, rb.root / "boot/second-base.cpio.gz")
    image.compile_tree(rb.root, "usr/lib/python3.11")
    out = image.write_cpio(rb.root, build / "stage1-base.cpio.gz", nodes=[image.CONSOLE], level=6)
    shutil.rmtree(rb.root)
    return out


# --------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=1)
def _sources_hash() -> str:
    """What shapes the cached base images: this file, image.py and both script folders."""
    digest = hashlib.sha256()
    files = [
        Path(__file__).resolve(),
        HERE / "image.py",
        *sorted(image.GUEST_SCRIPTS.iterdir()),
        *sorted(POWERNV_SCRIPTS.iterdir()),
    ]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_images(*, force: bool = False, project: bool = True) -> image.Images:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_images(cache, force=force, project=project)


def _build_images(cache: Path, *, force: bool, project: bool) -> image.Images:
    started = time.monotonic()
    packages = fetch_packages(cache / "debs")
    kpkg = next(n for n in packages if n.startswith("linux-image-") and n.endswith("-powerpc64le"))
    deb_names = sorted(p.name for p in packages.values())
    key = hashlib.sha256(
        json.dumps([_sources_hash(), deb_names, GUEST_MODULES]).encode()
    ).hexdigest()[:12]
    build = cache / f"build-{key}"
    info_path = build / "info.json"
    if force or not info_path.exists():
        t0 = time.monotonic()
        pkgroot = image.unpack_packages(packages, cache / "pkgroot")
        kver = image.kernel_version(pkgroot)
        modules_dir = image._modules_dir(pkgroot, kver)
        if not (modules_dir / "modules.dep").exists():
            base = modules_dir.parent.parent.parent
            image._run(["depmod", "-b", str(base), kver])
        modules = image.module_load_order(modules_dir, GUEST_MODULES)
        for old in cache.glob("build-*"):
            if old != build:
                shutil.rmtree(old, ignore_errors=True)
        if build.exists():
            shutil.rmtree(build)
        build.mkdir()
        vmlinux = build / "vmlinux"
        shutil.copy2(pkgroot / "boot" / f"vmlinux-{kver}", vmlinux)
        second = _build_second(pkgroot, build, kver, modules, modules_dir)
        stage1 = _build_stage1(pkgroot, build, kver, modules, modules_dir, vmlinux, second)
        info = {
            "kernel_version": kver,
            "kernel_package": kpkg,
            "packages": deb_names,
            "modules": modules,
            "sizes": {p.name: p.stat().st_size for p in (vmlinux, second, stage1)},
            "base_build_seconds": round(time.monotonic() - t0, 1),
        }
        info_path.write_text(json.dumps(info, indent=1))
        log(f"built base images in {build} in {info['base_build_seconds']}s")
    info = json.loads(info_path.read_text())

    deps_key = hashlib.sha256(json.dumps(image.project_dependencies()).encode()).hexdigest()[:12]
    deps_layer = build / f"deps-{deps_key}.cpio.gz"
    if force or not deps_layer.exists():
        for old in build.glob("deps-*.cpio.gz"):
            old.unlink()
        image.build_deps_layer(deps_layer)  # pure-Python wheels: the same on every arch

    session = cache / "session"
    session.mkdir(exist_ok=True)
    project_layer = session / "project.cpio.gz"
    how_path = session / "project.how"
    how = how_path.read_text() if how_path.exists() else "?"
    if project or not project_layer.exists():
        project_layer, how = image.build_project_layer(project_layer)
        how_path.write_text(how)
    log(f"images ready in {time.monotonic() - started:.1f}s")
    return image.Images(
        kernel=build / "vmlinux",
        kernel_version=info["kernel_version"],
        kernel_package=info["kernel_package"],
        stage1_base=build / "stage1-base.cpio.gz",
        second_base=build / "second-base.cpio.gz",
        deps_layer=deps_layer,
        project_layer=project_layer,
        project_install=how,
        build_dir=build,
        info=info,
    )


@functools.lru_cache(maxsize=1)
def current_images() -> image.Images:
    """Built once per process; the petitkexec layer fresh from the working tree."""
    return build_images()


# --------------------------------------------------------------------------- boot


def qemu_command(images: image.Images, initrd: Path, disk: Path, append: str) -> list[str]:
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise RuntimeError(f"{QEMU} not found: apt-get install qemu-system-ppc")
    args = [
        qemu,
        "-machine",
        MACHINE,
        "-accel",
        "tcg",
        "-m",
        MEMORY,
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(images.kernel),
        "-initrd",
        str(initrd),
        "-append",
        append,
        "-drive",
        f"if=none,id=nvmedisk,file={disk},format=raw",
    ]
    for option in TOPOLOGY:
        args += option.split(" ", 1)
    return args


def boot_powernv(
    scenario: str,
    *,
    second_scenario: str | None = None,
    load_second: bool = True,
    extra_qemu_args: Sequence[str] = (),
    nvme_image: Path | None = None,
    kernel_append: str = "",
    second_append: str = "",
    timeout: float = 300,
    poweroff_grace: float = 30,
    images: image.Images | None = None,
    echo: bool | None = None,
) -> guest.GuestRun:
    """guest.boot_guest for the powernv9 machine: same scenario contract, same GuestRun."""
    images = images or current_images()
    echo = bool(os.environ.get("PETITKEXEC_VM_ECHO")) if echo is None else echo
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    marker = uuid.uuid4().hex[:12]
    work = Path(tempfile.mkdtemp(prefix=f"run-{marker}-", dir=runs))
    log_path = runs / f"{marker}.log"
    for old_log in sorted(runs.glob("*.log"), key=lambda p: p.stat().st_mtime)[:-KEEP_LOGS]:
        old_log.unlink(missing_ok=True)
    disk = nvme_image
    if disk is None:
        disk = work / "nvme.img"
        with open(disk, "wb") as f:
            f.truncate(64 << 20)
    layer = guest._run_layer(
        work / "run.cpio.gz",
        scenario=scenario,
        second_scenario=second_scenario,
        marker=marker,
        load_second=load_second,
        # The common init puts console=ttyS0 first; the last console= is /dev/console.
        second_append=f"console={CONSOLE} {second_append}".strip(),
        virtfs=False,
    )
    initrd = work / "initrd.cpio.gz"
    with open(initrd, "wb") as out:
        for part in [*images.stage1_layers, layer]:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    append = f"console={CONSOLE} panic=-1 loglevel=6 {kernel_append}".strip()
    args = [*qemu_command(images, initrd, disk, append), *extra_qemu_args]

    started = time.monotonic()
    timed_out = poweroff_hung = False
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert proc.stdout is not None
        reader = guest._SerialReader(proc.stdout, log_file, started, echo)
        reader.start()
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - started > timeout:
                    timed_out = True
                    break
                final = reader.final_line_at
                if final is not None and now - final > poweroff_grace:
                    poweroff_hung = True
                    break
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=10)
    wall = time.monotonic() - started
    with reader.lock:
        lines = list(reader.lines)
    parsed: dict[str, Any] = guest._parse(lines, marker)
    shutil.rmtree(work, ignore_errors=True)
    return guest.GuestRun(
        log="\n".join(line for _, line in lines),
        log_path=log_path,
        marker=marker,
        timed_out=timed_out,
        poweroff_hung=poweroff_hung,
        qemu_returncode=proc.returncode,
        wall_seconds=wall,
        capture_path=None,
        qemu_args=args,
        **parsed,
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
