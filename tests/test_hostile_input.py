"""Hostile input for every parser: each either answers or raises its one documented error.

The suite runs a short version; `scripts/fuzz` runs 100,000 inputs per parser
(PETITKEXEC_FUZZ_EXAMPLES sets the count).
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from pathlib import Path
from typing import Any, Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petitkexec import attributes
from petitkexec.bdf import Bdf
from petitkexec.discovery import build_function
from petitkexec.errors import SnapshotError, UsageError
from petitkexec.facts import Mount
from petitkexec.model import PciFunction
from petitkexec.mounts import overlay_directories
from petitkexec.netstorage import (
    parse_endpoint,
    parse_ipv4_routes,
    parse_ipv6_routes,
    parse_nvme_address,
    parse_tcp_sockets,
    route_interface,
)
from petitkexec.policy import DeviceSpec
from petitkexec.settings import CONFIG_KEYS as SETTING_KEYS
from petitkexec.settings import load_config, resolve
from petitkexec.snapshot import snapshot_from_json
from tests.builders import endpoint

EXAMPLES = int(os.environ.get("PETITKEXEC_FUZZ_EXAMPLES", "300"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)

# Text that looks like what the parsers expect, mixed with anything at all.
NEAR_TEXT = st.text(alphabet=string.hexdigits + ":.*?[]-_ \t\n\x00(null)lassdrive", max_size=24)
ANY_TEXT = st.one_of(st.text(max_size=40), NEAR_TEXT)
FUNCTIONS = [
    endpoint("0000:00:1f.2", "ahci", class_code=0x010601),
    endpoint("0001:03:00.0", None, vendor=0x15B3, device=0x1017),
]


@fuzz
@given(ANY_TEXT)
def test_bdf_parse_answers_a_bdf_or_a_value_error(text: str) -> None:
    try:
        bdf = Bdf.parse(text)
    except ValueError:
        return
    assert Bdf.parse(str(bdf)) == bdf


@fuzz
@given(ANY_TEXT)
def test_device_spec_parse_answers_a_spec_or_a_usage_error(text: str) -> None:
    try:
        spec = DeviceSpec.parse(text, "--exclude")
    except UsageError as error:
        assert "\n" not in str(error)
        return
    for function in FUNCTIONS:
        assert spec.matches(function) in (True, False)


TOML_VALUES = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=12),
        NEAR_TEXT,
    ),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=8,
)
CONFIG_KEYS = st.sampled_from(sorted(SETTING_KEYS))


@fuzz
@given(st.dictionaries(CONFIG_KEYS, TOML_VALUES, max_size=5))
def test_config_values_resolve_or_raise_a_usage_error(config: dict[str, Any]) -> None:
    try:
        resolved = resolve({}, config, "c.toml")
    except UsageError as error:
        assert str(error).startswith("c.toml: ") and "\n" not in str(error)
        return
    jobs = resolved.execution.jobs
    assert resolved.execution.unbind_timeout_s >= 0.1 and (jobs is None or jobs >= 1)


@fuzz
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_a_config_file_of_any_bytes_loads_or_raises_a_usage_error(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".toml") as handle:
        handle.write(data)
        handle.flush()
        try:
            config, source = load_config(Path(handle.name))
            resolve({}, config, source)
        except UsageError as error:
            assert "\n" not in str(error)


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
VALID_SNAPSHOT: dict[str, Any] = {
    "format": "petitkexec-snapshot",
    "version": 1,
    "petitkexec": "0.1.0",
    "functions": [
        {
            "bdf": "0000:00:1f.2",
            "vendor": "8086",
            "device": "2922",
            "class": "010601",
            "header_type": 0,
            "command": 6,
            "driver": "ahci",
            "driver_can_unbind": True,
            "driver_override": None,
            "parent": None,
            "physfn": None,
            "enabled": True,
            "reset_methods": ["bus"],
            "has_reset": True,
            "has_reset_subordinate": False,
        }
    ],
    "facts": {"needed": {"0000:00:1f.2": "backs /"}, "lockdown": None, "kexec_loaded": True},
}


def _replace_one(document: Any, path: list[int], value: Any) -> Any:
    """A copy of `document` with the value at a pseudo-random place replaced."""
    if not path or not isinstance(document, (dict, list)) or not document:
        return value
    keys = list(document) if isinstance(document, dict) else list(range(len(document)))
    key = keys[path[0] % len(keys)]
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[key] = _replace_one(document[key], path[1:], value)  # type: ignore[index]
    return copy


@fuzz
@given(st.lists(st.integers(0, 50), max_size=5), JSON)
def test_a_damaged_snapshot_loads_or_raises_a_snapshot_error(path: list[int], value: Any) -> None:
    document = json.loads(json.dumps(_replace_one(VALID_SNAPSHOT, path, value)))
    try:
        topology, _facts = snapshot_from_json(document)
    except SnapshotError as error:
        assert "\n" not in str(error)
        return
    assert all(isinstance(function, PciFunction) for function in topology)


@fuzz
@given(ANY_TEXT | st.none())
def test_attribute_text_parsers_never_raise(text: str | None) -> None:
    assert attributes.parse_hex(text) is None or attributes.parse_hex(text) >= 0  # type: ignore[operator]
    count = attributes.parse_count(text)
    assert count is None or count >= 0
    override = attributes.parse_driver_override(text)
    assert override is None or (override.strip() == override and override != "(null)")
    assert all(" " not in word for word in attributes.parse_words(text))


@fuzz
@given(st.binary(max_size=70), st.integers(-2, 70))
def test_le16_reads_two_bytes_or_answers_none(data: bytes, offset: int) -> None:
    value = attributes.le16(data, offset)
    assert value is None or 0 <= value <= 0xFFFF


SYSFS_NAMES = st.sampled_from(["vendor", "device", "class", "enable", "driver_override"])


@fuzz
@given(st.dictionaries(SYSFS_NAMES, ANY_TEXT | st.none()), st.sampled_from(["0000:00:02.0", "x"]))
def test_a_function_with_any_attribute_text_is_built_or_left_out(
    texts: dict[str, str | None], name: str
) -> None:
    function = build_function(
        Path("/nonexistent/devices") / name, texts.get, driver=None, parent=None
    )
    assert function is None or function.bdf == Bdf.parse(name)


MOUNTINFO_WORDS = st.sampled_from(["22", "1", "259:0", "/", "rw,relatime", "-", "ext4", "ro"])


@fuzz
@given(st.lists(MOUNTINFO_WORDS | ANY_TEXT, max_size=12).map(" ".join))
def test_a_mountinfo_line_parses_or_raises_a_value_error(line: str) -> None:
    try:
        mount = Mount.parse(line)
    except ValueError:
        return
    assert isinstance(mount.writable, bool)


SUPER_OPTION_WORDS = st.sampled_from(
    ["upperdir=/u", "lowerdir=/a:/b\\:c", "lowerdir+=/l", "workdir=/w", "rw", "=", ":", "\\134"]
)


@fuzz
@given(st.lists(SUPER_OPTION_WORDS | ANY_TEXT, max_size=8).map(",".join))
def test_overlay_super_options_always_give_directories(options: str) -> None:
    mount = Mount.parse(f"29 1 0:50 / / rw - overlay overlay {options or 'rw'}")
    for key in ("upperdir", "lowerdir", "lowerdir+"):
        for value in mount.option(key):
            assert all(isinstance(d, str) and d for d in overlay_directories(value))


HEX_WORDS = st.text(alphabet=string.hexdigits, min_size=0, max_size=34)
ROUTE_LINES = st.lists(
    st.lists(
        HEX_WORDS | ANY_TEXT | st.sampled_from(["eth0", "lo", "0001", "0003"]), max_size=12
    ).map("\t".join),
    max_size=6,
).map("\n".join)


@fuzz
@given(ROUTE_LINES, st.sampled_from(["little", "big"]))
def test_proc_net_route_of_any_text_gives_routes_that_match_addresses(
    text: str, byteorder: Literal["little", "big"]
) -> None:
    for route in parse_ipv4_routes("header\n" + text, byteorder):
        assert route.network.version == 4
        assert route_interface([route], route.network.network_address) == route.interface


@fuzz
@given(ROUTE_LINES.map(lambda text: text.replace("\t", " ")))
def test_proc_net_ipv6_route_of_any_text_gives_routes(text: str) -> None:
    for route in parse_ipv6_routes(text):
        assert route.network.version == 6 and 0 <= route.network.prefixlen <= 128


@fuzz
@given(
    st.lists(
        st.lists(HEX_WORDS.map(lambda w: w + ":" + w[:4]) | HEX_WORDS | ANY_TEXT, max_size=12).map(
            " ".join
        ),
        max_size=5,
    ).map("\n".join),
    st.sampled_from(["little", "big"]),
)
def test_proc_net_tcp_of_any_text_gives_socket_endpoints(
    text: str, byteorder: Literal["little", "big"]
) -> None:
    for inode, (local, remote) in parse_tcp_sockets("header\n" + text, byteorder).items():
        assert isinstance(inode, int)
        assert local.port is not None and 0 <= local.port <= 0xFFFF
        assert remote.port is not None and 0 <= remote.port <= 0xFFFF


NVME_ADDRESS_WORDS = st.sampled_from(
    ["traddr=10.0.0.1", "trsvcid=4420", "host_iface=eth0", "src_addr=::1", "=", ",", "traddr="]
)


@fuzz
@given(st.lists(NVME_ADDRESS_WORDS | ANY_TEXT, max_size=6).map(",".join))
def test_an_nvme_address_of_any_text_gives_keys_and_an_endpoint_or_none(text: str) -> None:
    pairs = parse_nvme_address(text)
    assert all(key and "," not in key and "," not in value for key, value in pairs.items())
    endpoint = parse_endpoint(pairs.get("traddr", ""), pairs.get("trsvcid"))
    assert endpoint is None or endpoint.address.version in (4, 6)
