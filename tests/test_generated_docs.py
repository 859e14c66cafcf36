"""What scripts/generated_docs.py derives from the code: the README's settings table, and the
man pages debian/rules installs (one per command, read from the click commands)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

from petitkexec.cli import cli
from petitkexec.settings import CONFIG_KEYS, SETTINGS, resolve

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _generated_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generated_docs", REPO / "scripts" / "generated_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docs = _generated_docs()


def _between(text: str, start: str, end: str) -> str:
    found = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, re.S)
    assert found, f"README.md has no {start} ... {end}"
    return found.group(1)


# --- the README's settings table ---------------------------------------------------------------


def test_readme_settings_table_is_the_generated_one() -> None:
    table = _between(README.read_text(), "<!-- settings-table -->", "<!-- /settings-table -->")
    assert table == docs.settings_table(), (
        "README.md's settings table differs from settings.py's: paste in the output of "
        "`python3 scripts/generated_docs.py settings-table`"
    )


def test_settings_table_has_a_row_per_setting_with_its_default() -> None:
    rows = docs.settings_table().splitlines()[2:]
    assert [row.split("`")[1].split()[0] for row in rows] == [s.option for s in SETTINGS]
    jobs = next(row for row in rows if row.startswith("| `--jobs"))
    assert "at most 64" in jobs  # settings.MAX_AUTO_JOBS, not the 8 the README once said


def test_readme_config_example_is_accepted() -> None:
    """Every key of the README's /etc/petitkexec.toml example is a setting, every value valid."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    example = _between(README.read_text(), "```toml", "```")
    config = tomllib.loads(example)
    assert set(config) <= set(CONFIG_KEYS), sorted(set(config) - set(CONFIG_KEYS))
    settings = resolve({}, config, "README.md")
    assert settings.execution.jobs == config["jobs"]


# --- man pages ---------------------------------------------------------------------------------


def test_a_man_page_for_every_command() -> None:
    assert isinstance(cli, click.Group)
    pages = docs.man_pages()
    assert set(pages) == {"petitkexec.1", *(f"petitkexec-{name}.1" for name in cli.commands)}


def test_every_option_of_a_command_is_in_its_man_page() -> None:
    assert isinstance(cli, click.Group)
    pages = docs.man_pages()
    for name, command in cli.commands.items():
        page = pages[f"petitkexec-{name}.1"]
        for param in command.params:
            for option in getattr(param, "opts", []):
                if option.startswith("-"):
                    assert option.replace("-", "\\-") in page, (name, option)
        assert ".SH EXIT STATUS" in page and "\n  130  interrupted" in page, name


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff (groff-base) is not installed")
def test_man_pages_render_without_groff_warnings(tmp_path: Path) -> None:
    for name, text in docs.man_pages().items():
        path = tmp_path / name
        path.write_text(text)
        done = subprocess.run(
            ["groff", "-man", "-ww", "-z", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr)


def test_roff_escapes_what_groff_would_read_as_requests() -> None:
    assert docs._roff(".hidden\n'also\n-x \\n") == "\\&.hidden\n\\&'also\n\\-x \\en"
