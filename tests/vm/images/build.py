"""Build the lane's images, or reuse them: what is rebuilt when.

- the base images (kernel, stage-1 and second-kernel initramfs) in ``build-<key>/``, where
  the key hashes the files that shape them (this package, tests/vm/guest/, the lane's own
  sources), the downloaded packages and the modules: editing any of them rebuilds;
- petitkexec's dependencies next to them, keyed by the list in pyproject.toml;
- petitkexec itself in ``session/``, rebuilt once per process from the working tree.

Callers want `current_images(lane)`; `build_images` is the same without the per-process memo.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from .debs import (
    fetch_packages,
    kernel_modules_dir,
    kernel_version,
    module_load_order,
    unpack_packages,
)
from .initramfs import GUEST_SCRIPTS, build_second, build_stage1
from .lanes import X86, Lane
from .layers import build_deps_layer, build_project_layer, project_dependencies
from .run import log

PACKAGE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Images:
    """What a boot needs. `stage1_layers` concatenated (+ a run's layer) is the initrd."""

    kernel: Path
    kernel_version: str
    kernel_package: str
    stage1_base: Path
    second_base: Path
    deps_layer: Path
    project_layer: Path
    project_install: str  # "pip", "copied" or "missing"
    build_dir: Path
    info: dict[str, Any]

    @property
    def stage1_layers(self) -> list[Path]:
        return [self.stage1_base, self.deps_layer, self.project_layer]


@functools.cache
def _sources_hash(lane: Lane) -> str:
    """Hash of everything that shapes a lane's cached images (this package's modules, the
    guest scripts and the lane's own sources)."""
    files = [*sorted(PACKAGE.glob("*.py")), *sorted(GUEST_SCRIPTS.iterdir())]
    for source in lane.sources:
        files += sorted(source.iterdir()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _base_images(
    lane: Lane, cache: Path, build: Path, packages: dict[str, Path], *, force: bool
) -> dict[str, Any]:
    """The kernel and the two base initramfs images in `build`; returns its info.json."""
    info_path = build / "info.json"
    if not force and info_path.exists():
        info: dict[str, Any] = json.loads(info_path.read_text())
        return info
    started = time.monotonic()
    flavour = f"-{lane.kernel_flavour}"
    kpkg = next(n for n in packages if n.startswith("linux-image-") and n.endswith(flavour))
    pkgroot = unpack_packages(packages, cache / "pkgroot")
    kver = kernel_version(pkgroot)
    modules_dir = kernel_modules_dir(pkgroot, kver)
    modules = module_load_order(modules_dir, lane.guest_modules)
    for old in cache.glob("build-*"):
        if old != build:
            shutil.rmtree(old, ignore_errors=True)
    if build.exists():
        shutil.rmtree(build)
    build.mkdir()
    kernel = build / lane.kernel_file
    shutil.copy2(pkgroot / "boot" / f"{lane.kernel_file}-{kver}", kernel)
    second = build_second(lane, pkgroot, build, kver, modules, modules_dir)
    stage1 = build_stage1(lane, pkgroot, build, kver, modules, modules_dir, kernel, second)
    info = {
        "kernel_version": kver,
        "kernel_package": kpkg,
        "packages": sorted(p.name for p in packages.values()),
        "modules": modules,
        "sizes": {p.name: p.stat().st_size for p in (kernel, second, stage1)},
        "base_build_seconds": round(time.monotonic() - started, 1),
    }
    info_path.write_text(json.dumps(info, indent=1))
    log(f"built base images in {build} in {info['base_build_seconds']}s")
    return info


def _deps_layer(build: Path, *, force: bool) -> Path:
    key = hashlib.sha256(json.dumps(project_dependencies()).encode()).hexdigest()[:12]
    layer = build / f"deps-{key}.cpio.gz"
    if force or not layer.exists():
        started = time.monotonic()
        for old in build.glob("deps-*.cpio.gz"):
            old.unlink()
        build_deps_layer(layer)  # pure-Python wheels: the same on every architecture
        log(f"built the dependency layer in {time.monotonic() - started:.1f}s")
    return layer


def _project_layer(session: Path, *, rebuild: bool) -> tuple[Path, str]:
    """petitkexec's layer and how it was installed (project.how beside it)."""
    session.mkdir(exist_ok=True)
    layer = session / "project.cpio.gz"
    how_path = session / "project.how"
    how = how_path.read_text() if how_path.exists() else "?"
    if rebuild or not layer.exists():
        started = time.monotonic()
        layer, how = build_project_layer(layer)
        how_path.write_text(how)
        log(f"built the petitkexec layer ({how}) in {time.monotonic() - started:.1f}s")
    return layer, how


def build_images(*, force: bool = False, project: bool = True, lane: Lane = X86) -> Images:
    """Build (or reuse) the cached images; rebuild the petitkexec layer unless project=False."""
    cache = lane.cache()
    cache.mkdir(parents=True, exist_ok=True)
    # Two test runs in one checkout would otherwise delete each other's half-built images.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_images(lane, cache, force=force, project=project)


def _build_images(lane: Lane, cache: Path, *, force: bool, project: bool) -> Images:
    started = time.monotonic()
    packages = fetch_packages(cache / "debs", lane)
    deb_names = sorted(p.name for p in packages.values())
    key = hashlib.sha256(
        json.dumps([_sources_hash(lane), deb_names, lane.guest_modules]).encode()
    ).hexdigest()[:12]
    build = cache / f"build-{key}"
    info = _base_images(lane, cache, build, packages, force=force)
    deps_layer = _deps_layer(build, force=force)
    project_layer, how = _project_layer(cache / "session", rebuild=project)
    log(f"{lane.name} images ready in {time.monotonic() - started:.1f}s")
    return Images(
        kernel=build / lane.kernel_file,
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


_CURRENT: dict[str, Images] = {}


def current_images(lane: Lane = X86) -> Images:
    """The lane's images for this process: built once, petitkexec layer fresh from the tree."""
    if lane.name not in _CURRENT:
        _CURRENT[lane.name] = build_images(lane=lane)
    return _CURRENT[lane.name]
