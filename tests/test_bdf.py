"""Bdf: the PCI address value type, parsed strictly and spelled the way sysfs spells it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from petitkexec.bdf import Bdf

bdfs = st.builds(
    Bdf,
    domain=st.integers(0, 0xFFFFFFFF),
    bus=st.integers(0, 0xFF),
    device=st.integers(0, 0x1F),
    function=st.integers(0, 7),
)


def test_full_form_parses_to_its_four_fields() -> None:
    assert Bdf.parse("0000:00:1f.2") == Bdf(domain=0, bus=0, device=0x1F, function=2)
    assert Bdf.parse("0001:3d:00.7") == Bdf(domain=1, bus=0x3D, device=0, function=7)


def test_short_form_means_domain_0000() -> None:
    assert Bdf.parse("00:1f.2") == Bdf.parse("0000:00:1f.2")


def test_hex_digits_may_be_upper_case_and_print_lower_case() -> None:
    assert str(Bdf.parse("000A:3D:1F.3")) == "000a:3d:1f.3"


def test_domains_wider_than_four_digits_parse_as_vmd_and_powernv_print_them() -> None:
    assert Bdf.parse("10000:e1:00.0") == Bdf(domain=0x10000, bus=0xE1, device=0, function=0)


def test_a_trailing_newline_as_sysfs_values_have_is_tolerated() -> None:
    assert Bdf.parse("0000:00:1f.2\n") == Bdf(0, 0, 0x1F, 2)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0000:00:1f",  # no function
        "0000:00:1f.8",  # function above 7
        "0000:00:20.0",  # device above 1f
        "000:00:1f.2",  # three-digit domain
        "0000:0:1f.2",  # one-digit bus
        "0000:00:1f.2.3",
        "0000:00:1f.2/",
        "g000:00:1f.2",
        "0000-00-1f.2",
        "pci0000:00",
        "8086:10d3",
        "0000:00:1f.2\nfoo",
    ],
)
def test_anything_but_a_pci_address_is_a_value_error_quoting_the_text(text: str) -> None:
    with pytest.raises(ValueError) as raised:
        Bdf.parse(text)
    assert repr(text) in str(raised.value)
    assert "not a PCI address" in str(raised.value)


@pytest.mark.parametrize(
    ("domain", "bus", "device", "function"),
    [(0, 0x100, 0, 0), (0, 0, 0x20, 0), (0, 0, 0, 8), (-1, 0, 0, 0), (0x1_0000_0000, 0, 0, 0)],
)
def test_fields_out_of_range_are_refused_at_construction(
    domain: int, bus: int, device: int, function: int
) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Bdf(domain, bus, device, function)


def test_addresses_order_by_domain_then_bus_then_device_then_function() -> None:
    texts = ["0001:00:00.0", "0000:01:00.0", "0000:00:1f.0", "0000:00:02.1", "0000:00:02.0"]
    assert [str(bdf) for bdf in sorted(Bdf.parse(text) for text in texts)] == [
        "0000:00:02.0",
        "0000:00:02.1",
        "0000:00:1f.0",
        "0000:01:00.0",
        "0001:00:00.0",
    ]


def test_str_is_zero_padded_full_form() -> None:
    assert str(Bdf(0, 1, 2, 3)) == "0000:01:02.3"


@given(bdfs)
def test_str_round_trips_through_parse(bdf: Bdf) -> None:
    assert Bdf.parse(str(bdf)) == bdf


@given(bdfs)
def test_ordering_agrees_with_the_field_tuple(bdf: Bdf) -> None:
    other = Bdf(bdf.domain, bdf.bus, bdf.device, (bdf.function + 1) % 8)
    key = (bdf.domain, bdf.bus, bdf.device, bdf.function)
    other_key = (other.domain, other.bus, other.device, other.function)
    assert (bdf < other) == (key < other_key)


def test_functions_of_one_device_share_a_slot() -> None:
    assert Bdf.parse("0000:00:1f.0").slot == Bdf.parse("0000:00:1f.3").slot == (0, 0, 0x1F)
    assert Bdf.parse("0000:00:1f.0").slot != Bdf.parse("0000:00:1e.0").slot


def test_innermost_in_gives_the_function_a_sysfs_path_lies_below() -> None:
    path = "/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/nvme/nvme0/nvme0n1"
    assert Bdf.innermost_in(path) == Bdf.parse("0000:01:00.0")


def test_innermost_in_follows_a_switch_down_to_the_endpoint() -> None:
    path = (
        "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:03.0/0000:03:00.1"
        "/host0/target0:0:0/0:0:0:0/block/sda/sda1"
    )
    assert str(Bdf.innermost_in(path)) == "0000:03:00.1"


def test_innermost_in_does_not_take_the_host_bridge_name_or_scsi_usb_and_serial_names() -> None:
    assert Bdf.innermost_in("/sys/devices/pci0000:00") is None
    assert Bdf.innermost_in("/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1:1.0") == Bdf.parse(
        "0000:00:14.0"
    )
    assert Bdf.innermost_in(
        "/sys/devices/pci0000:00/0000:00:16.3/0000:00:16.3:0/0000:00:16.3:0.0"
    ) == Bdf.parse("0000:00:16.3")


def test_innermost_in_a_virtual_device_finds_nothing() -> None:
    assert Bdf.innermost_in("/sys/devices/virtual/block/dm-0") is None


def test_innermost_in_needs_the_domain_that_sysfs_always_writes() -> None:
    assert Bdf.innermost_in("/sys/bus/pci/devices/00:1f.2") is None


def test_innermost_in_reads_wide_domains() -> None:
    path = "/sys/devices/pci10000:e0/10000:e0:06.0/10000:e1:00.0/nvme/nvme1"
    assert str(Bdf.innermost_in(path)) == "10000:e1:00.0"
