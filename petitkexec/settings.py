"""Every setting declared once: its option, its config-file key, how its value is read, its default.

The click options, the config file's known keys, validation and the defaults shown in `--help`
are all derived from `SETTINGS` (the shape of ukify's ConfigItem and mkosi's ConfigSetting).
A value is read the same way wherever it comes from, and an error names the option or the key
as the user wrote it.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from petitkexec.errors import UsageError
from petitkexec.policy import DeviceSpec, Policy
from petitkexec.quirks import QUIRKS

DEFAULT_CONFIG_PATH = Path("/etc/petitkexec.toml")


class Scope(Enum):
    PLAN = "plan"  # every command that plans: plan, teardown, exec
    EXECUTE = "execute"  # only the commands that carry a plan out: teardown, exec
    REPORT = "report"  # where a result goes besides stdout: verify


Parser = Callable[[Any, str], Any]  # (raw value, where it came from) -> value, or UsageError


# eq=False: equal only to itself; nothing compares one (no __eq__/__hash__ to compile at start)
@dataclass(frozen=True, eq=False)
class Setting:
    """One setting: its command-line option, its config-file key and how to parse both."""

    name: str  # the keyword click passes, and the field it fills
    option: str
    help: str
    parse: Parser
    scope: Scope
    default: Any = None
    config_key: str | None = None  # None: command line only
    multiple: bool = False  # a list: the config file's entries, then each use of the option
    flag: bool = False  # on if the option or the config file says so
    metavar: str | None = None

    @property
    def help_text(self) -> str:
        if self.multiple or self.flag or self.default is None:
            return self.help
        return f"{self.help} [default: {self.default:g}]"


def _specs(value: Any, where: str) -> tuple[DeviceSpec, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise UsageError(where, value, "must be a string or a list of strings")
    return tuple(DeviceSpec.parse(text, where) for text in values)


def _quirk_ids(value: Any, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise UsageError(where, value, "must be a string or a list of strings")
    known = {quirk.id for quirk in QUIRKS}
    for name in values:
        if name not in known:
            raise UsageError(where, name, "is not a quirk; known: " + ", ".join(sorted(known)))
    return tuple(values)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(where, value, "must be true or false")
    return value


def _number(value: Any, where: str, whole: bool, minimum: float, unit: str) -> float:
    """A number from the config file, or text from the command line."""
    number: float | None = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
    if (
        number is None
        or not math.isfinite(number)
        or number < minimum
        or (whole and not number.is_integer())
    ):
        raise UsageError(where, value, f"must be {unit} of at least {minimum:g}")
    return number


def _seconds(value: Any, where: str) -> float:
    return _number(value, where, False, 0.1, "a number of seconds")


def _textfile(value: Any, where: str) -> Path:
    """A node_exporter textfile: a .prom file (the only ones it reads) in a directory that
    exists (the file is written next to it under another name, then renamed)."""
    if not isinstance(value, str) or not value:
        raise UsageError(where, value, "must be a file name")
    path = Path(value)
    if path.suffix != ".prom":
        raise UsageError(where, value, "must end in .prom (node_exporter reads only those)")
    if not path.parent.is_dir():
        raise UsageError(where, value, "is in a directory that does not exist")
    return path


def _count(value: Any, where: str) -> int:
    return int(_number(value, where, True, 1, "a whole number"))


# The unbind deadline: long enough for NVMe's controller shutdown (4.5-13 s per drive seen in
# the field, nvme_disable_ctrl) would be too long for a bootloader; 5 s covers most hardware,
# and a hang is what the deadline exists to catch.
DEFAULT_UNBIND_TIMEOUT_S = 5.0
# A kernel bus reset waits up to 60 s for devices answering CRS (PCIE_RESET_READY_POLL_MS);
# past that it is stuck in the kernel, holding the locks of every device below.
DEFAULT_RESET_TIMEOUT_S = 75.0
# Independent remove() calls run side by side: a slow one costs its own time, not everyone's.
# By default as many as there are unbinds and resets to do (each is a child process that
# mostly sleeps in the kernel), up to this many.
MAX_AUTO_JOBS = 64

SETTINGS = (
    Setting(
        "exclude",
        "--exclude",
        "Leave matching functions alone: BDF glob, vendor:device, class:HEX or driver name. "
        "Repeatable.",
        _specs,
        Scope.PLAN,
        config_key="exclude",
        multiple=True,
        metavar="SPEC",
    ),
    Setting(
        "only",
        "--only",
        "Touch only matching functions (same syntax). Repeatable.",
        _specs,
        Scope.PLAN,
        config_key="only",
        multiple=True,
        metavar="SPEC",
    ),
    Setting(
        "unprotect",
        "--unprotect",
        "Tear down matching functions even if the running system needs them "
        "(the root disk, a mounted share, the console).",
        _specs,
        Scope.PLAN,
        config_key="unprotect",
        multiple=True,
        metavar="SPEC",
    ),
    Setting(
        "ignore_quirks",
        "--ignore-quirk",
        "Do not apply this quirk (an id shown in the plan's reasons). Repeatable.",
        _quirk_ids,
        Scope.PLAN,
        config_key="ignore-quirks",
        multiple=True,
        metavar="ID",
    ),
    Setting(
        "hot_reset",
        "--hot-reset",
        "Add a secondary-bus reset of each fully torn-down bridge, last.",
        _flag,
        Scope.PLAN,
        config_key="hot-reset",
        flag=True,
    ),
    Setting(
        "unbind_timeout",
        "--unbind-timeout",
        "Deadline for each driver unbind.",
        _seconds,
        Scope.EXECUTE,
        default=DEFAULT_UNBIND_TIMEOUT_S,
        config_key="unbind-timeout",
        metavar="SECONDS",
    ),
    Setting(
        "reset_timeout",
        "--reset-timeout",
        "Deadline for each bus reset.",
        _seconds,
        Scope.EXECUTE,
        default=DEFAULT_RESET_TIMEOUT_S,
        config_key="reset-timeout",
        metavar="SECONDS",
    ),
    Setting(
        "time_limit",
        "--time-limit",
        "Bound the whole teardown: no step starts, and no deadline reaches, past this many "
        "seconds [default: none].",
        _seconds,
        Scope.EXECUTE,
        config_key="time-limit",
        metavar="SECONDS",
    ),
    Setting(
        "no_rollback",
        "--no-rollback",
        "Leave the machine torn down when the run stops early (a hang, a signal, the time "
        "limit): for callers that hand off regardless, such as systemd-shutdown.",
        _flag,
        Scope.EXECUTE,
        flag=True,
    ),
    Setting(
        "jobs",
        "--jobs",
        "Unbind up to this many independent devices side by side (1: one at a time) "
        f"[default: every independent one, at most {MAX_AUTO_JOBS}].",
        _count,
        Scope.EXECUTE,
        config_key="jobs",
        metavar="N",
    ),
    Setting(
        "raw_sbr",
        "--raw-sbr",
        "Allow a raw secondary-bus reset through Bridge Control when the kernel offers no "
        "reset (never on PowerNV).",
        _flag,
        Scope.EXECUTE,
        config_key="raw-sbr",
        flag=True,
    ),
    Setting(
        "metrics",
        "--metrics",
        "Also write the result for node_exporter's textfile collector to FILE (.prom), atomically.",
        _textfile,
        Scope.REPORT,
        metavar="FILE",
    ),
    Setting(
        "dry_run",
        "--dry-run",
        "Print what would run; change nothing.",
        _flag,
        Scope.EXECUTE,
        flag=True,
    ),
)
CONFIG_KEYS = {s.config_key: s for s in SETTINGS if s.config_key is not None}


@dataclass(frozen=True)
class ExecutionOptions:
    """How a plan is carried out."""

    unbind_timeout_s: float = DEFAULT_UNBIND_TIMEOUT_S
    reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S
    time_limit_s: float | None = None
    rollback: bool = True
    jobs: int | None = None  # None: every independent step at once, up to MAX_AUTO_JOBS
    raw_sbr: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Settings:
    """Every setting of a command, resolved: the plan's policy and how to execute it."""

    policy: Policy = field(default_factory=Policy)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    metrics: Path | None = None  # node_exporter textfile to write the result to


def resolve(
    given: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    config_source: str = "config",
) -> Settings:
    """Merge the command line (`given`, by setting name; None or empty = not given) over the
    config file: lists are the file's entries then the options', flags are or-ed, a value
    given on the command line replaces the file's."""
    config = config or {}
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        from_file = None
        if setting.config_key is not None and setting.config_key in config:
            where = f"{config_source}: {setting.config_key}"
            from_file = setting.parse(config[setting.config_key], where)
        raw = given.get(setting.name)
        from_option = None if raw in (None, (), [], False) else setting.parse(raw, setting.option)
        if setting.multiple:
            values[setting.name] = (*(from_file or ()), *(from_option or ()))
        elif setting.flag:
            values[setting.name] = bool(from_file or from_option)
        else:
            values[setting.name] = from_file if from_option is None else from_option
            if values[setting.name] is None:
                values[setting.name] = setting.default
    return Settings(
        Policy(
            values["exclude"],
            values["only"],
            values["unprotect"],
            values["hot_reset"],
            frozenset(values["ignore_quirks"]),
        ),
        ExecutionOptions(
            unbind_timeout_s=values["unbind_timeout"],
            reset_timeout_s=values["reset_timeout"],
            time_limit_s=values["time_limit"],
            rollback=not values["no_rollback"],
            jobs=values["jobs"],
            raw_sbr=values["raw_sbr"],
            dry_run=values["dry_run"],
        ),
        values["metrics"],
    )


def load_config(path: Path | None, euid: int = -1) -> tuple[dict[str, Any], str]:
    """Read the TOML config and say where it came from: a missing default file is empty, a
    missing --config an error. Run as root (`euid` 0), a file that someone else could have
    written is refused: its `unprotect` key decides what gets torn down."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return {}, str(DEFAULT_CONFIG_PATH)
        path, option = DEFAULT_CONFIG_PATH, str(DEFAULT_CONFIG_PATH)
    else:
        option = "--config"
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as handle:
            if euid == 0:
                _check_trusted(handle.fileno(), option, path)
            config: dict[str, Any] = tomllib.load(handle)
    except OSError as error:
        raise UsageError(option, str(path), f"cannot be read ({error.strerror})") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(option, str(path), f"is not valid TOML ({error})") from error
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(
            option,
            str(path),
            f"has unknown key {unknown[0]!r}; known: " + ", ".join(sorted(CONFIG_KEYS)),
        )
    return config, str(path)


def _check_trusted(fd: int, option: str, path: Path) -> None:
    status = os.fstat(fd)
    if status.st_uid != 0 or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            option,
            str(path),
            f"may be written by others than root (owner uid {status.st_uid}, mode "
            f"{stat.S_IMODE(status.st_mode):04o}): refused; chown root and chmod go-w",
        )
