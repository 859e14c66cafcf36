"""The buildroot recipes in contrib/buildroot/ must not drift from pyproject.toml.

Plain parsing, no buildroot checkout and no network: the version, license and build backend of
python-petitkexec, the runtime dependencies its Config.in selects, the versions of the
dependency recipes shipped here, their .hash files, and the Config.in wiring of the tree.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport is a runtime dependency on 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
TREE = REPO / "contrib" / "buildroot"
PACKAGES = TREE / "package"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# The oldest Python of the buildroot trees these recipes are written for (2024.02, the base of
# op-build's 2024.02 branch, ships 3.11; master ships 3.14). Dependencies whose marker is false
# there (tomli: `python_version < '3.11'`) are not needed on the target.
BUILDROOT_PYTHON = "3.11"
# Runtime dependencies buildroot ships itself, with the oldest version among the trees above
# (buildroot 2024.02; 2025.02 has click 8.1.8 and pyudev 0.24.3, master 8.4.2 and 0.24.4).
BUILDROOT_SHIPS = {"click": "8.1.7", "pyudev": "0.24.1"}
# pyproject's build backend -> the buildroot SETUP_TYPE that provides it, and the host packages
# a `pep517` recipe must then depend on itself.
SETUP_TYPES = {
    "setuptools.build_meta": ("setuptools", ()),
    "hatchling.build": ("pep517", ("host-python-hatchling",)),
    "flit_core.buildapi": ("flit", ()),
}


def mk_variables(path: Path) -> dict[str, str]:
    """The `NAME = value` / `NAME += value` assignments of a .mk file, continuations joined."""
    variables: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        match = re.match(r"([A-Z0-9_]+)\s*(\+?=)\s*(.*)$", line)
        if match is None:
            continue
        name, operator, value = match.groups()
        value = " ".join(value.split())
        if operator == "+=" and name in variables:
            value = f"{variables[name]} {value}"
        variables[name] = value
    return variables


def expand(value: str, variables: dict[str, str]) -> str:
    """Replace $(NAME) by the recipe's own NAME; buildroot's variables stay as they are."""
    return re.sub(r"\$\(([A-Z0-9_]+)\)", lambda m: variables.get(m[1], m[0]), value)


def kconfig_entries(path: Path) -> dict[str, list[str]]:
    """Each `config SYMBOL` of a Config.in with its attribute lines (comments dropped)."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if raw.startswith("config "):
            current = entries.setdefault(line.split()[1], [])
        elif raw and not raw[0].isspace():
            current = None  # comment, menu, if, source ... end the entry
        elif current is not None and line:
            current.append(line)
    return entries


def selects(entry: list[str]) -> set[str]:
    return {line.split()[1] for line in entry if line.startswith("select ")}


def symbol(package: str) -> str:
    """buildroot's Kconfig symbol of a Python package: click -> BR2_PACKAGE_PYTHON_CLICK."""
    return "BR2_PACKAGE_PYTHON_" + re.sub(r"[-_.]+", "_", package).upper()


def prefix(recipe_dir: str) -> str:
    """The make variable prefix of a recipe: python-structlog -> PYTHON_STRUCTLOG."""
    return recipe_dir.replace("-", "_").upper()


def needed_on_buildroot(requirement: Requirement) -> bool:
    marker = requirement.marker
    environment = {"python_version": BUILDROOT_PYTHON, "python_full_version": "3.11.0"}
    return marker is None or marker.evaluate(environment)


def runtime_requirements() -> dict[str, Requirement]:
    requirements = (Requirement(spec) for spec in PROJECT["dependencies"])
    return {r.name.lower(): r for r in requirements if needed_on_buildroot(r)}


def recipe_dirs() -> list[Path]:
    return sorted(p for p in PACKAGES.iterdir() if p.is_dir())


def dependency_recipes() -> dict[str, dict[str, str]]:
    """PyPI name -> variables of the dependency recipes shipped here (all but petitkexec)."""
    recipes = {}
    for directory in recipe_dirs():
        if directory.name != "python-petitkexec":
            name = directory.name.removeprefix("python-")
            recipes[name] = mk_variables(directory / f"{directory.name}.mk")
    return recipes


PETITKEXEC_MK = mk_variables(PACKAGES / "python-petitkexec" / "python-petitkexec.mk")
PETITKEXEC_CONFIG = kconfig_entries(PACKAGES / "python-petitkexec" / "Config.in")[
    "BR2_PACKAGE_PYTHON_PETITKEXEC"
]


def test_external_tree_is_named_petitkexec_and_includes_every_recipe() -> None:
    desc = dict(
        line.split(":", 1) for line in (TREE / "external.desc").read_text().splitlines() if line
    )
    assert desc["name"].strip() == "PETITKEXEC"
    assert len(desc["desc"].strip()) <= 40  # buildroot's manual: about 40 characters at most
    external_mk = (TREE / "external.mk").read_text()
    assert "$(BR2_EXTERNAL_PETITKEXEC_PATH)/package/*/*.mk" in external_mk
    assert [d.name for d in recipe_dirs()] == ["python-petitkexec", "python-structlog"]
    for directory in recipe_dirs():
        variables = mk_variables(directory / f"{directory.name}.mk")
        assert f"{prefix(directory.name)}_SETUP_TYPE" in variables, directory.name
        assert "$(eval $(python-package))" in (directory / f"{directory.name}.mk").read_text()


def test_every_config_in_of_the_tree_is_sourced_from_the_top_config_in() -> None:
    sourced = re.findall(r'^source "([^"]+)"$', (TREE / "Config.in").read_text(), re.M)
    present = sorted(
        f"$BR2_EXTERNAL_PETITKEXEC_PATH/{p.relative_to(TREE)}"
        for p in TREE.rglob("Config.in")
        if p != TREE / "Config.in"
    )
    assert sorted(sourced) == present
    assert "$BR2_EXTERNAL_PETITKEXEC_PATH/package/python-petitkexec/Config.in" in sourced
    for directory in recipe_dirs():
        entries = kconfig_entries(directory / "Config.in")
        assert list(entries) == [f"BR2_PACKAGE_{prefix(directory.name)}"]
        (entry,) = entries.values()
        # An external Config.in is not inside buildroot's `if BR2_PACKAGE_PYTHON3`.
        assert "depends on BR2_PACKAGE_PYTHON3" in entry, directory.name


def test_petitkexec_recipe_builds_this_source_tree_with_its_build_backend() -> None:
    assert PETITKEXEC_MK["PYTHON_PETITKEXEC_SITE_METHOD"] == "local"
    site = PETITKEXEC_MK["PYTHON_PETITKEXEC_SITE"]
    assert site == "$(BR2_EXTERNAL_PETITKEXEC_PATH)/../.."
    resolved = Path(site.replace("$(BR2_EXTERNAL_PETITKEXEC_PATH)", str(TREE))).resolve()
    assert resolved == REPO
    assert (resolved / "pyproject.toml").is_file()
    setup_type, _ = SETUP_TYPES[PYPROJECT["build-system"]["build-backend"]]
    assert PETITKEXEC_MK["PYTHON_PETITKEXEC_SETUP_TYPE"] == setup_type == "setuptools"
    # A local package has no download to hash; a hash of the working tree would go stale.
    assert not (PACKAGES / "python-petitkexec" / "python-petitkexec.hash").exists()
    # The rsync into the build directory must not drag the developer's venv along.
    exclusions = PETITKEXEC_MK["PYTHON_PETITKEXEC_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS"]
    assert "--exclude /.cache" in exclusions
    assert "--exclude /petitkexec" not in exclusions


def test_petitkexec_version_and_license_equal_pyproject() -> None:
    assert PETITKEXEC_MK["PYTHON_PETITKEXEC_VERSION"] == PROJECT["version"]
    assert PETITKEXEC_MK["PYTHON_PETITKEXEC_LICENSE"] == PROJECT["license"]["text"]
    assert PETITKEXEC_MK["PYTHON_PETITKEXEC_LICENSE"] == "GPL-2.0-or-later"


def test_buildroot_python_satisfies_requires_python() -> None:
    assert SpecifierSet(PROJECT["requires-python"]).contains(BUILDROOT_PYTHON)


def test_marker_evaluation_drops_only_what_buildroot_python_does_not_need() -> None:
    assert not needed_on_buildroot(Requirement("tomli>=2.0; python_version < '3.11'"))
    assert needed_on_buildroot(Requirement("click>=8.1"))
    assert needed_on_buildroot(Requirement("x; python_version >= '3.11'"))


def test_every_runtime_dependency_is_selected_and_packaged() -> None:
    required = runtime_requirements()
    assert required, "pyproject lists no runtime dependency"
    python_selects = {s for s in selects(PETITKEXEC_CONFIG) if s.startswith("BR2_PACKAGE_PYTHON_")}
    # Selected: everything needed, and nothing pyproject no longer lists.
    assert python_selects == {symbol(name) for name in required}
    recipes = dependency_recipes()
    for name in required:
        assert (name in recipes) != (name in BUILDROOT_SHIPS), name
    # No recipe here for something petitkexec does not need (or buildroot already ships).
    assert set(recipes) <= set(required) - set(BUILDROOT_SHIPS)


def test_dependency_versions_satisfy_pyproject_bounds() -> None:
    required = runtime_requirements()
    versions = {
        name: v[f"{prefix('python-' + name)}_VERSION"] for name, v in dependency_recipes().items()
    }
    versions.update(BUILDROOT_SHIPS)
    assert set(versions) == set(required)
    for name, version in versions.items():
        assert required[name].specifier.contains(Version(version)), (name, version)


def test_dependency_recipes_download_the_pypi_sdist_with_real_hashes() -> None:
    for name, variables in dependency_recipes().items():
        var = prefix("python-" + name)
        version = variables[f"{var}_VERSION"]
        source = expand(variables[f"{var}_SOURCE"], variables)
        assert source == f"{name.replace('-', '_')}-{version}.tar.gz"
        assert re.fullmatch(
            r"https://files\.pythonhosted\.org/packages/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{60}",
            variables[f"{var}_SITE"],
        )
        hashes = {}
        hash_file = PACKAGES / f"python-{name}" / f"python-{name}.hash"
        for line in hash_file.read_text().splitlines():
            if line and not line.startswith("#"):
                algorithm, digest, filename = line.split()
                if algorithm == "sha256":
                    hashes[filename] = digest
        license_files = variables[f"{var}_LICENSE_FILES"].split()
        assert set(hashes) == {source, *license_files}
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in hashes.values())


def test_dependency_licenses_match_the_installed_distribution() -> None:
    checked = 0
    for name, variables in dependency_recipes().items():
        try:
            metadata = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        expression = metadata.get("License-Expression")
        if expression is None:
            continue
        ours = variables[f"{prefix('python-' + name)}_LICENSE"]
        assert {p.strip() for p in ours.split(" or ")} == {
            p.strip() for p in expression.split(" OR ")
        }, name
        checked += 1
    if checked == 0:
        pytest.skip("no dependency recipe's distribution with a License-Expression is installed")
