"""The guest's Debian packages: resolved and downloaded with apt, unpacked with dpkg-deb.

No package is installed: `apt-get download` fetches the lane's root packages and, following
Depends/Pre-Depends, the library packages they need; `dpkg-deb -x` unpacks them all into one
tree (pkgroot) that the guest roots are assembled from. The kernel and its modules come from
the same tree: `kernel_version`, `kernel_modules_dir` and `module_load_order` read it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from .lanes import X86, Lane
from .run import ImageError, log, run

KERNEL_SERIES = "6.1."


def apt(
    lane: Lane, args: list[str], *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """apt-get/apt-cache as the lane reaches apt (unchecked)."""
    env = None if lane.apt_env is None else lane.apt_env()
    return run(args, cwd=cwd, env=env, check=False)


def kernel_package(lane: Lane = X86) -> str:
    """The exact Debian 12 kernel package behind linux-image-<flavour> (linux-image-6.1.*-...).
    A private apt's lists are refreshed first when stale, and again if they name no kernel."""
    meta = f"linux-image-{lane.kernel_flavour}"
    for attempt in range(1 if lane.update_lists is None else 2):
        if lane.update_lists is not None:
            lane.update_lists(attempt > 0)
        out = apt(lane, ["apt-cache", "depends", meta]).stdout
        names = re.findall(rf"Depends:\s*(linux-image-\S+-{lane.kernel_flavour})", out)
        if names:
            return str(names[0])
    hint = "" if lane.update_lists else "; run `apt-get update` (see .ci/apt-packages)"
    raise ImageError(f"apt-cache depends {meta} ({lane.arch}) names no kernel{hint}")


def _deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def _parse_depends(value: str) -> list[str]:
    """Library package names from a Depends value; of alternatives the first library one."""
    names = []
    for clause in filter(None, (c.strip() for c in value.split(","))):
        for alternative in clause.split("|"):
            name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
            if name.startswith("lib") or name == "zlib1g":
                names.append(name)
                break
    return names


def _download(lane: Lane, names: Iterable[str], debs: Path, roots: list[str]) -> None:
    names = sorted(set(names))
    if not names or apt(lane, ["apt-get", "download", *names], cwd=debs).returncode == 0:
        return
    # One unknown (virtual) name fails the batch: retry one by one, give up only on roots.
    for name in names:
        one = apt(lane, ["apt-get", "download", name], cwd=debs)
        if one.returncode != 0:
            if name in roots:
                raise ImageError(f"apt-get download {name} ({lane.arch}) failed:\n{one.stderr}")
            log(f"skipping dependency {name}: {one.stderr.strip().splitlines()[-1:]}")


def fetch_packages(debs: Path, lane: Lane = X86) -> dict[str, Path]:
    """Download the lane's root packages and their library closure; return {package: .deb}.

    A manifest pins what was downloaded, so later runs reuse the same files. The host's apt is
    asked for the kernel every time (a newer one replaces the set); with a private apt, whose
    lists are refreshed only when needed, the set stays pinned until the root packages change.
    """
    debs.mkdir(parents=True, exist_ok=True)
    manifest_path = debs / "manifest.json"
    roots = None if lane.update_lists else [kernel_package(lane), *lane.root_packages]
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        pinned = manifest.get("roots", [])
        current = pinned == roots if roots else pinned[1:] == list(lane.root_packages)
        if current and all((debs / f).exists() for f in manifest["packages"].values()):
            return {name: debs / f for name, f in manifest["packages"].items()}
    started = time.monotonic()
    roots = roots or [kernel_package(lane), *lane.root_packages]
    for stale in debs.glob("*.deb"):
        stale.unlink()
    have: dict[str, Path] = {}
    asked: set[str] = set()
    todo = set(roots)
    while todo:
        _download(lane, todo, debs, roots)
        asked |= todo
        for deb in debs.glob("*.deb"):
            have.setdefault(deb.name.split("_", 1)[0], deb)
        new: set[str] = set()
        for name in todo & set(have):
            for field in ("Pre-Depends", "Depends"):
                new.update(_parse_depends(_deb_field(have[name], field)))
        # Names asked for that never arrived (virtual packages) are not asked again.
        todo = new - set(have) - asked
    packages = {name: deb.name for name, deb in sorted(have.items())}
    manifest_path.write_text(json.dumps({"roots": roots, "packages": packages}, indent=1))
    log(f"downloaded {len(packages)} {lane.arch} packages in {time.monotonic() - started:.1f}s")
    return {name: debs / f for name, f in packages.items()}


def unpack_packages(packages: dict[str, Path], pkgroot: Path) -> Path:
    """dpkg-deb -x every package into one tree (cached by the list of .deb files)."""
    stamp = pkgroot / ".unpacked"
    want = "\n".join(sorted(p.name for p in packages.values()))
    if stamp.exists() and stamp.read_text() == want:
        return pkgroot
    started = time.monotonic()
    if pkgroot.exists():
        shutil.rmtree(pkgroot)
    pkgroot.mkdir(parents=True)
    for deb in packages.values():
        run(["dpkg-deb", "-x", str(deb), str(pkgroot)])
    stamp.write_text(want)
    log(f"unpacked {len(packages)} packages in {time.monotonic() - started:.1f}s")
    return pkgroot


def kernel_version(pkgroot: Path) -> str:
    versions = sorted(p.name for p in (pkgroot / "lib/modules").iterdir() if p.is_dir())
    if not versions:
        versions = sorted(p.name for p in (pkgroot / "usr/lib/modules").iterdir() if p.is_dir())
    if len(versions) != 1 or not versions[0].startswith(KERNEL_SERIES):
        raise ImageError(f"expected one {KERNEL_SERIES}* kernel in {pkgroot}, found {versions}")
    return versions[0]


def kernel_modules_dir(pkgroot: Path, kver: str) -> Path:
    """The kernel's module folder, with a modules.dep (depmod'ed here when missing)."""
    for base in ("lib/modules", "usr/lib/modules"):
        if (pkgroot / base / kver).is_dir():
            found = pkgroot / base / kver
            break
    else:
        raise ImageError(f"no modules for {kver} in {pkgroot}")
    if not (found / "modules.dep").exists():
        # Debian does not ship modules.dep; generate it the way the postinst would.
        run(["depmod", "-b", str(found.parent.parent.parent), kver])
    return found


def module_load_order(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to the modules dir) of `names` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists the full closure, deepest last: load from the end.
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ImageError(f"module {name} not in {modules_dir}/modules.dep")
        visit(by_name[key])
    return order
