"""Documentation derived from the code, so that it cannot drift from it.

    python3 scripts/generated_docs.py man DIR          one man page per command (debian/rules)
    python3 scripts/generated_docs.py settings-table   the README's settings table (markdown)

The man pages are read from the click commands (their help, options and epilog), the settings
table from `petitkexec.settings.SETTINGS`; tests/test_generated_docs.py checks that the
README's table is the one printed here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
# Run as a script: petitkexec is the one on PYTHONPATH (debian/rules: the package being built),
# else the one installed, else this tree's.
sys.path.append(str(REPO))

from petitkexec import __version__  # noqa: E402
from petitkexec.cli import cli  # noqa: E402
from petitkexec.settings import SETTINGS, Scope  # noqa: E402

PROGRAM = "petitkexec"
# click's marker for a paragraph it must not rewrap (the exit-code table).
NO_REWRAP = "\b"


# ---------------------------------------------------------------------------------------------
# Man pages (roff, man(7) macros)


def _roff(text: str) -> str:
    """Text as roff: backslashes and minus signs escaped, no line starting with a control
    character (a `.` or `'` there would be read as a request)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _paragraphs(text: str) -> list[str]:
    """Help text as roff paragraphs: rewrapped ones as running text, click's `\\b` ones kept
    line for line (.nf)."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if block.startswith(NO_REWRAP):
            body = block[len(NO_REWRAP) :].strip("\n")
            out.append(".PP\n.nf\n" + _roff(body) + "\n.fi")
        else:
            out.append(".PP\n" + _roff(" ".join(block.split())))
    return out


def _options(command: click.Command, context: click.Context) -> list[str]:
    out = []
    for param in command.get_params(context):
        record = param.get_help_record(context)
        if record is None:  # an argument: shown in the synopsis
            continue
        names, help_text = record
        out.append(".TP\n.B " + _roff(names) + "\n" + _roff(" ".join(help_text.split())))
    return out


def _page(
    name: str,
    command: click.Command,
    context: click.Context,
    subcommands: list[tuple[str, click.Command]],
) -> str:
    title = name.upper()
    short = command.get_short_help_str(limit=200).rstrip(".")
    usage = " ".join(command.collect_usage_pieces(context))
    lines = [
        f'.TH {_roff(title)} 1 "" "{PROGRAM} {__version__}" "User Commands"',
        ".nh",  # no hyphenation: option and command names stay whole
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(short)}",
        ".SH SYNOPSIS",
        f".B {_roff(context.command_path)}",
        _roff(usage),
        ".SH DESCRIPTION",
        *_paragraphs(command.help or ""),
    ]
    options = _options(command, context)
    if options:
        lines += [".SH OPTIONS", *options]
    if subcommands:
        lines.append(".SH COMMANDS")
        for sub_name, sub in subcommands:
            lines += [
                ".TP",
                f".B {_roff(sub_name)}",
                _roff(sub.get_short_help_str(limit=200))
                + f" See \\fB{PROGRAM}\\-{_roff(sub_name)}\\fR(1).",
            ]
    if command.epilog:
        lines += [".SH EXIT STATUS", *_paragraphs(command.epilog)]
    see_also = [f"{PROGRAM}-{sub}" for sub, _ in subcommands] if subcommands else [PROGRAM]
    lines += [".SH SEE ALSO", ", ".join(f"\\fB{_roff(page)}\\fR(1)" for page in see_also)]
    return "\n".join(lines) + "\n"


def man_pages() -> dict[str, str]:
    """File name -> roff text: petitkexec.1, and petitkexec-COMMAND.1 for every command."""
    assert isinstance(cli, click.Group)
    top = click.Context(cli, info_name=PROGRAM, **cli.context_settings)
    commands = sorted(cli.commands.items())
    pages = {f"{PROGRAM}.1": _page(PROGRAM, cli, top, commands)}
    for name, command in commands:
        context = click.Context(command, info_name=name, parent=top)
        pages[f"{PROGRAM}-{name}.1"] = _page(f"{PROGRAM}-{name}", command, context, [])
    return pages


# ---------------------------------------------------------------------------------------------
# The README's settings table


def _default(setting: object) -> str:
    from petitkexec.settings import Setting

    assert isinstance(setting, Setting)
    if setting.multiple:
        return "none"
    if setting.flag:
        return "off"
    if setting.default is None:
        # the option's help says what no value means, in brackets: "[default: ...]"
        found = re.search(r"\[default: ([^]]+)\]", setting.help)
        return found.group(1) if found else "none"
    return f"{setting.default:g}"


def settings_table() -> str:
    """Every setting, as `petitkexec.settings.SETTINGS` declares it (markdown)."""
    rows = [
        "| option | config key | commands | default | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        option = setting.option + (f" {setting.metavar}" if setting.metavar else "")
        key = f"`{setting.config_key}`" if setting.config_key else "(command line only)"
        commands = {
            Scope.PLAN: "plan, teardown, exec",
            Scope.EXECUTE: "teardown, exec",
            Scope.REPORT: "verify, teardown, exec",
        }[setting.scope]
        what = re.sub(r"\s*\[default: [^]]+\]", "", setting.help)
        rows.append(f"| `{option}` | {key} | {commands} | {_default(setting)} | {what} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["man"] and len(argv) == 2:
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        for name, text in man_pages().items():
            (out / name).write_text(text)
        return 0
    if argv == ["settings-table"]:
        sys.stdout.write(settings_table())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
