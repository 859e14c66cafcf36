"""Policy: --exclude/--only/--unprotect specs, --hot-reset, and the config file adding to them."""

from __future__ import annotations

import pytest

from petitkexec.errors import ExitCode, UsageError
from petitkexec.model import PciFunction
from petitkexec.policy import DeviceSpec
from tests.builders import endpoint, policy_of


def function(
    bdf: str,
    vendor: int = 0x8086,
    device: int = 0x10D3,
    class_code: int = 0x020000,
    driver: str | None = None,
) -> PciFunction:
    return endpoint(bdf, driver, vendor=vendor, device=device, class_code=class_code)


E1000E = function("0000:02:00.0", 0x8086, 0x10D3, 0x020000, "e1000e")
E1000E_OTHER_ID = function("0000:02:00.1", 0x8086, 0x10D4, 0x020000, "e1000e")
VIRTIO = function("0000:00:03.0", 0x1AF4, 0x1041, 0x020000, "virtio-pci")
XHCI = function("0000:03:00.0", 0x1B36, 0x000D, 0x0C0330, "xhci_hcd")
EHCI = function("0000:00:1d.0", 0x8086, 0x293A, 0x0C0320, "ehci-pci")
SMBUS = function("0000:00:1f.3", 0x8086, 0x2930, 0x0C0500)
AHCI = function("0000:00:1f.2", 0x8086, 0x2922, 0x010601, "ahci")
LPC = function("0000:00:1f.0", 0x8086, 0x2918, 0x060100, "lpc_ich")
NVME = function("0000:01:00.0", 0x1B36, 0x0010, 0x010802, "nvme")
OTHER_DOMAIN_AHCI = function("0001:00:1f.2", 0x8086, 0x2922, 0x010601, "ahci")
ALL = [E1000E, E1000E_OTHER_ID, VIRTIO, XHCI, EHCI, SMBUS, AHCI, LPC, NVME, OTHER_DOMAIN_AHCI]


def matching(spec_text: str) -> list[str]:
    spec = DeviceSpec.parse(spec_text, "--exclude")
    return sorted(str(f.bdf) for f in ALL if spec.matches(f))


# --- BDF globs ---------------------------------------------------------------------------------


def test_a_bdf_glob_matches_every_function_of_the_slot() -> None:
    assert matching("0000:00:1f.*") == ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]


def test_a_short_bdf_glob_means_domain_0000() -> None:
    spec = DeviceSpec.parse("00:1f.*", "--exclude")
    assert (spec.kind, spec.pattern) == ("bdf", "0000:00:1f.*")
    assert matching("00:1f.2") == ["0000:00:1f.2"]  # not 0001:00:1f.2


def test_a_bdf_glob_with_a_domain_matches_only_that_domain() -> None:
    assert matching("0001:00:1f.2") == ["0001:00:1f.2"]
    assert matching("*:00:1f.2") == ["0000:00:1f.2", "0001:00:1f.2"]


def test_a_bdf_glob_is_case_insensitive_and_takes_character_classes() -> None:
    assert matching("0000:00:1F.2") == ["0000:00:1f.2"]
    assert matching("0000:0[1-2]:00.0") == ["0000:01:00.0", "0000:02:00.0"]


# --- vendor:device ----------------------------------------------------------------------------


def test_vendor_device_matches_that_exact_id() -> None:
    assert DeviceSpec.parse("8086:10d3", "--exclude").kind == "id"
    assert matching("8086:10d3") == ["0000:02:00.0"]
    assert matching("8086:10D3") == ["0000:02:00.0"]


def test_vendor_star_matches_every_device_of_the_vendor() -> None:
    assert matching("1af4:*") == ["0000:00:03.0"]
    assert matching("8086:*") == [
        "0000:00:1d.0",
        "0000:00:1f.0",
        "0000:00:1f.2",
        "0000:00:1f.3",
        "0000:02:00.0",
        "0000:02:00.1",
        "0001:00:1f.2",
    ]


def test_star_device_id_matches_that_device_from_any_vendor() -> None:
    assert matching("*:000d") == ["0000:03:00.0"]


# --- class prefixes ---------------------------------------------------------------------------


def test_a_two_digit_class_matches_the_base_class() -> None:
    assert matching("class:0c") == ["0000:00:1d.0", "0000:00:1f.3", "0000:03:00.0"]


def test_a_four_digit_class_matches_base_class_and_subclass() -> None:
    assert matching("class:0c03") == ["0000:00:1d.0", "0000:03:00.0"]


def test_a_six_digit_class_matches_the_programming_interface_too() -> None:
    assert matching("class:0c0330") == ["0000:03:00.0"]  # xHCI, not EHCI (0c0320)


def test_a_class_may_be_written_with_0x_and_upper_case() -> None:
    assert DeviceSpec.parse("class:0x0C03", "--exclude").pattern == "0c03"
    assert matching("class:0x0106") == ["0000:00:1f.2", "0001:00:1f.2"]


# --- drivers ----------------------------------------------------------------------------------


def test_a_bare_name_matches_the_bound_driver() -> None:
    spec = DeviceSpec.parse("nvme", "--exclude")
    assert (spec.kind, spec.pattern) == ("driver", "nvme")
    assert matching("nvme") == ["0000:01:00.0"]
    assert matching("virtio-pci") == ["0000:00:03.0"]


def test_driver_prefix_names_a_driver_explicitly() -> None:
    assert matching("driver:ahci") == ["0000:00:1f.2", "0001:00:1f.2"]


def test_a_driver_spec_does_not_match_an_unbound_function() -> None:
    assert not DeviceSpec.parse("driver:i801_smbus", "--exclude").matches(SMBUS)


# --- bad specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["zz:zz", "class:0c0", "class:xyz", "0000:00:1f", "00:1f.8", "*", "", "8086:10d3:1", "a b"],
)
def test_a_bad_spec_is_a_usage_error_naming_the_option_and_value(text: str) -> None:
    with pytest.raises(UsageError) as raised:
        DeviceSpec.parse(text, "--exclude")
    message = str(raised.value)
    assert message.startswith(f"--exclude: {text!r} is not a device spec")
    assert "\n" not in message
    assert raised.value.option == "--exclude"
    assert raised.value.value == text
    assert raised.value.exit_code is ExitCode.USAGE


def test_the_zz_zz_message_reads_as_documented() -> None:
    with pytest.raises(UsageError, match=r"^--exclude: 'zz:zz' is not a device spec; expected "):
        policy_of(exclude=["zz:zz"])


@pytest.mark.parametrize("option", ["exclude", "only", "unprotect"])
def test_each_policy_option_names_itself_in_its_error(option: str) -> None:
    with pytest.raises(UsageError) as raised:
        policy_of(**{option: ["zz:zz"]})  # type: ignore[arg-type]
    assert str(raised.value).startswith(f"--{option}: 'zz:zz' ")


# --- Policy -----------------------------------------------------------------------------------


def test_exclude_gives_the_spec_as_written_as_the_reason() -> None:
    policy = policy_of(exclude=["0000:00:1f.*"])
    assert policy.excluded_by(AHCI) == "excluded by --exclude 0000:00:1f.*"
    assert policy.excluded_by(NVME) is None


def test_only_keeps_everything_it_does_not_select() -> None:
    policy = policy_of(only=["nvme", "class:0c03"])
    assert policy.excluded_by(NVME) is None
    assert policy.excluded_by(XHCI) is None
    assert policy.excluded_by(AHCI) == "not selected by --only"


def test_exclude_wins_over_only() -> None:
    policy = policy_of(exclude=["nvme"], only=["nvme"])
    assert policy.excluded_by(NVME) == "excluded by --exclude nvme"


def test_without_specs_everything_may_be_touched() -> None:
    policy = policy_of()
    assert all(policy.excluded_by(f) is None for f in ALL)
    assert not any(policy.unprotected(f) for f in ALL)
    assert policy.hot_reset is False


def test_unprotect_matches_by_spec() -> None:
    policy = policy_of(unprotect=["0000:01:00.0"])
    assert policy.unprotected(NVME)
    assert not policy.unprotected(AHCI)
