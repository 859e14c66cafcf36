"""Settings: each declared once, read the same from the command line and the config file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from petitkexec import settings as settings_module
from petitkexec.cli import cli
from petitkexec.errors import ExitCode, UsageError
from petitkexec.settings import CONFIG_KEYS, SETTINGS, load_config, resolve
from tests.builders import endpoint, policy_of
from tests.clirun import runner

NVME = endpoint("0000:01:00.0", "nvme", class_code=0x010802)
AHCI = endpoint("0000:00:1f.2", "ahci", class_code=0x010601)


def test_config_lists_are_merged_with_command_line_values() -> None:
    policy = policy_of(
        exclude=["ahci"],
        only=["class:01"],
        unprotect=["8086:*"],
        config={"exclude": ["nvme"], "only": "class:0c", "unprotect": ["1b36:0010"]},
    )
    assert [spec.text for spec in policy.exclude] == ["nvme", "ahci"]
    assert [spec.text for spec in policy.only] == ["class:0c", "class:01"]
    assert [spec.text for spec in policy.unprotect] == ["1b36:0010", "8086:*"]
    assert policy.excluded_by(NVME) == "excluded by --exclude nvme"
    assert policy.excluded_by(AHCI) == "excluded by --exclude ahci"


def test_hot_reset_comes_from_the_flag_or_the_config_file() -> None:
    assert policy_of(hot_reset=True).hot_reset
    assert policy_of(config={"hot-reset": True}).hot_reset
    assert not policy_of(config={"hot-reset": False}).hot_reset


def test_a_bad_spec_in_the_config_file_names_the_key() -> None:
    with pytest.raises(UsageError, match=r"^config: only: 'zz:zz' "):
        policy_of(config={"only": ["zz:zz"]})


@pytest.mark.parametrize("value", [5, ["nvme", 1], {"a": "b"}, True])
def test_a_config_list_of_the_wrong_type_names_the_key(value: object) -> None:
    with pytest.raises(UsageError) as raised:
        policy_of(config={"exclude": value})
    assert str(raised.value).startswith("config: exclude: ")
    assert "must be a string or a list of strings" in str(raised.value)


def test_a_config_hot_reset_that_is_not_a_boolean_names_the_key() -> None:
    with pytest.raises(UsageError, match=r"^config: hot-reset: .* must be true or false$"):
        policy_of(config={"hot-reset": "yes"})


# --- the config file --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_config_file_with_every_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "petitkexec.toml",
        'exclude = ["0000:00:1f.*", "ahci"]\n'
        'only = "class:0c03"\n'
        'unprotect = ["nvme"]\n'
        "hot-reset = true\n"
        "unbind-timeout = 5.0\n",
    )
    assert load_config(path) == (
        {
            "exclude": ["0000:00:1f.*", "ahci"],
            "only": "class:0c03",
            "unprotect": ["nvme"],
            "hot-reset": True,
            "unbind-timeout": 5.0,
        },
        str(path),
    )


def test_a_loaded_config_feeds_the_policy(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'exclude = ["0000:00:1f.*"]\nhot-reset = true\n')
    config, source = load_config(path)
    policy = resolve({"exclude": ["nvme"]}, config, source).policy
    assert [spec.text for spec in policy.exclude] == ["0000:00:1f.*", "nvme"]
    assert policy.hot_reset


def test_an_unknown_config_key_is_an_error_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'exclude = []\nexlude = ["nvme"]\n')
    with pytest.raises(UsageError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(f"--config: {str(path)!r} has unknown key 'exlude'")
    assert message.endswith("; known: " + ", ".join(sorted(CONFIG_KEYS)))
    assert "exclude" in CONFIG_KEYS
    assert raised.value.exit_code is ExitCode.USAGE


def test_a_file_that_is_not_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "exclude = [nvme\n")
    with pytest.raises(UsageError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"--config: {str(path)!r} is not valid TOML")
    assert "\n" not in str(raised.value)


def test_a_file_that_is_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    # tomllib.load() decodes the bytes itself and lets UnicodeDecodeError through.
    path = tmp_path / "c.toml"
    path.write_bytes(b'exclude = ["\xff"]\n')
    with pytest.raises(UsageError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"--config: {str(path)!r} ")


def test_a_missing_config_file_given_with_config_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(UsageError) as raised:
        load_config(path)
    assert (
        str(raised.value) == f"--config: {str(path)!r} cannot be read (No such file or directory)"
    )


def test_a_missing_default_config_file_is_an_empty_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load_config(None) == ({}, str(tmp_path / "absent.toml"))


def test_errors_in_the_default_config_file_name_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "petitkexec.toml", "bogus = 1\n")
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", path)
    with pytest.raises(UsageError) as raised:
        load_config(None)
    assert raised.value.option == str(path)
    assert str(raised.value).startswith(f"{path}: {str(path)!r} has unknown key 'bogus'")


# --- who may have written it (run as root, its `unprotect` decides what is torn down) ---------


def owned_by(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    """The config file's owner as fstat() reports it, whoever runs the test: the check reads
    the owner and mode from the open file, and chown needs root."""
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        status = list(real_fstat(fd))
        status[4] = uid  # st_uid
        return os.stat_result(status)

    monkeypatch.setattr(settings_module.os, "fstat", fstat)


@pytest.mark.parametrize(
    ("uid", "mode"),
    [
        (0, 0o620),  # group-writable
        (0, 0o602),  # other-writable
        (0, 0o666),
        (0, 0o660),
        (1000, 0o644),  # a user's own file
        (1000, 0o600),
    ],
    ids=[
        "group-writable",
        "other-writable",
        "world-writable",
        "group-rw",
        "user-0644",
        "user-0600",
    ],
)
def test_root_refuses_a_config_file_someone_else_could_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uid: int, mode: int
) -> None:
    path = write(tmp_path / "c.toml", 'unprotect = ["nvme"]\n')
    path.chmod(mode)
    owned_by(monkeypatch, uid)
    with pytest.raises(UsageError) as raised:
        load_config(path, euid=0)
    assert str(raised.value) == (
        f"--config: {str(path)!r} may be written by others than root (owner uid {uid}, mode "
        f"{mode:04o}): refused; chown root and chmod go-w"
    )


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o400, 0o755], ids=oct)
def test_root_reads_a_config_file_only_root_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = write(tmp_path / "c.toml", 'unprotect = ["nvme"]\n')
    path.chmod(mode)
    owned_by(monkeypatch, 0)
    assert load_config(path, euid=0) == ({"unprotect": ["nvme"]}, str(path))


def test_the_default_config_file_refused_is_named_as_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "petitkexec.toml", "")
    path.chmod(0o664)
    owned_by(monkeypatch, 0)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", path)
    with pytest.raises(UsageError) as raised:
        load_config(None, euid=0)
    assert raised.value.option == str(path)


def test_a_user_running_it_reads_their_own_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not root: nothing is torn down (preflight refuses), so plan and --dry-run read any file.
    path = write(tmp_path / "c.toml", 'exclude = ["nvme"]\n')
    path.chmod(0o666)
    owned_by(monkeypatch, 1000)
    assert load_config(path, euid=1000) == ({"exclude": ["nvme"]}, str(path))


# --- one declaration per setting --------------------------------------------------------------


def test_every_config_key_is_a_setting_with_an_option() -> None:
    assert set(CONFIG_KEYS) == {
        "exclude",
        "only",
        "unprotect",
        "ignore-quirks",
        "hot-reset",
        "unbind-timeout",
        "reset-timeout",
        "time-limit",
        "jobs",
        "raw-sbr",
    }
    for key, setting in CONFIG_KEYS.items():
        assert setting.option in (f"--{key}", f"--{key.removesuffix('s')}")  # one per use


@pytest.mark.parametrize("command", ["plan", "teardown", "exec"])
def test_the_help_shows_each_default_from_the_table(command: str) -> None:
    text = " ".join(runner().invoke(cli, [command, "--help"]).stdout.split())
    for setting in SETTINGS:
        if command == "plan" and setting.scope is not settings_module.Scope.PLAN:
            assert setting.option not in text
            continue
        assert setting.option in text
        if setting.default is not None:
            assert f"[default: {setting.default:g}]" in text


def test_the_command_line_value_replaces_the_config_files() -> None:
    assert resolve({}, {"unbind-timeout": 2}).execution.unbind_timeout_s == 2.0
    assert (
        resolve({"unbind_timeout": "0.5"}, {"unbind-timeout": 2}).execution.unbind_timeout_s == 0.5
    )
    assert resolve({}).execution.unbind_timeout_s == settings_module.DEFAULT_UNBIND_TIMEOUT_S
    assert resolve({"jobs": "3"}, {"jobs": 1}).execution.jobs == 3


@pytest.mark.parametrize(
    ("given", "config", "message"),
    [
        ({"unbind_timeout": "abc"}, {}, "--unbind-timeout: 'abc' must be a number of seconds"),
        ({"unbind_timeout": "0"}, {}, "--unbind-timeout: '0' must be a number of seconds"),
        ({}, {"unbind-timeout": "abc"}, "config: unbind-timeout: 'abc' must be a number"),
        ({}, {"unbind-timeout": True}, "config: unbind-timeout: True must be a number"),
        ({}, {"unbind-timeout": float("nan")}, "config: unbind-timeout: nan must be a number"),
        ({"jobs": "2.5"}, {}, "--jobs: '2.5' must be a whole number of at least 1"),
        ({}, {"jobs": 0}, "config: jobs: 0 must be a whole number of at least 1"),
        ({}, {"raw-sbr": "yes"}, "config: raw-sbr: 'yes' must be true or false"),
    ],
)
def test_a_bad_value_names_the_option_or_key_and_quotes_the_value_once(
    given: dict[str, object], config: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError) as raised:
        resolve(given, config)
    assert str(raised.value).startswith(message)
    assert raised.value.exit_code is ExitCode.USAGE


def test_a_bad_value_in_a_config_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('unbind-timeout = "abc"\n')
    result = runner().invoke(cli, ["plan", "--config", str(path), "--snapshot", "/nonexistent"])
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.splitlines()[0] == (
        f"petitkexec: {path}: unbind-timeout: 'abc' must be a number of seconds of at least 0.1"
    )


def test_policy_settings_arrive_in_the_policy() -> None:
    policy = policy_of(exclude=["ahci"], config={"exclude": "nvme", "hot-reset": True})
    assert policy.excluded_by(NVME) == "excluded by --exclude nvme"
    assert policy.excluded_by(AHCI) == "excluded by --exclude ahci"
    assert policy.hot_reset
