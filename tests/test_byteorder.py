"""Byte order never from the host: config space in sysfs is little-endian on every CPU.

pci_read_config()/pci_write_config() in drivers/pci/pci-sysfs.c hand out and take config
space as little-endian bytes whatever the CPU (POWER8/9 may run big-endian). Two checks:

- every config helper runs on a simulated kernel twice, on this (little-endian) host and on a
  simulated big-endian one, and reads the same values and writes the same bytes, which are
  also the values and bytes the simulated devices hold and expect;
- no code in the package takes the byte order from the host: every int.from_bytes/to_bytes
  names "little", every struct format names its order, and sys.byteorder, array and
  memoryview.cast are not used (except where the CPU's order is the right one, listed below).

The big-endian host: sys.byteorder is "big", and struct (the module and its functions, in
every petitkexec module that holds them, and in the struct module itself for imports made
later) packs native formats big-endian. int.from_bytes/to_bytes cannot be patched (a built-in
type); they take the order as an argument, which the static check requires to be "little".
"""

from __future__ import annotations

import _struct
import ast
import importlib
import pkgutil
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import petitkexec
from petitkexec.attributes import le16
from petitkexec.bdf import Bdf
from petitkexec.discovery import build_function, function_from_sysfs, read_config_header
from petitkexec.model import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_COMMAND,
    PCI_HEADER_TYPE,
)
from tests.conftest import q35_like
from tests.simkernel import SimFunction, SimKernel

PACKAGE = Path(petitkexec.__file__).parent
STRUCT_FUNCTIONS = ("pack", "unpack", "unpack_from", "pack_into", "iter_unpack", "calcsize")
ORDERED = ("<", ">", "!")
# Where the CPU's own order is the right one: (file, call, format) -> why.
NATIVE_ORDER_ALLOWED = {
    ("watchdog.py", "struct.pack", "i"): "an ioctl argument is an int in the CPU's order "
    "(WDIOC_SETTIMEOUT, WDIOC_KEEPALIVE), not config space",
    ("netstorage.py", "sys.byteorder", None): "/proc/net/route and /proc/net/tcp print each "
    "__be32 address word as a native integer (%08X, fib_route_seq_show(), tcp4_seq_show()): "
    "its digits are in the CPU's order; a parameter, so tests read both orders",
    ("netstorage.py", "to_bytes", None): "those words turned back into network-order bytes, "
    "in the order they were printed in",
}
# Values whose two bytes differ, so that a swap shows. The bridge control value has the
# secondary bus reset bit in its low byte, where the kernel (and the simulation) look for it.
COMMAND_WRITTEN = 0x0546
BRIDGE_CONTROL_WRITTEN = 0x0A13 | PCI_BRIDGE_CTL_BUS_RESET
SCRATCH_OFFSET, SCRATCH_VALUE = 0x40, 0xBEEF


# -- the simulated big-endian host ------------------------------------------------------------


def _big_endian_format(format: str | bytes) -> str:
    text = format.decode() if isinstance(format, bytes) else format
    if text[:1] in ORDERED:
        return text
    body = text[1:] if text[:1] in ("@", "=") else text
    if text[:1] != "=" and _struct.calcsize("@" + body) != _struct.calcsize("=" + body):
        raise AssertionError(f"cannot simulate the native sizes or alignment of {text!r}")
    return ">" + body


def _native_is_big(function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(format: str | bytes, *args: Any) -> Any:
        return function(_big_endian_format(format), *args)

    wrapped.__name__ = function.__name__
    return wrapped


def _big_endian_struct_class(format: str | bytes) -> struct.Struct:
    return _struct.Struct(_big_endian_format(format))


def all_modules() -> Iterator[ModuleType]:
    yield petitkexec
    for info in pkgutil.walk_packages(petitkexec.__path__, "petitkexec."):
        if info.name != "petitkexec.__main__":  # runs the CLI
            yield importlib.import_module(info.name)


def simulate_big_endian_host(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ModuleType("struct")
    replacements: dict[Any, Any] = {struct.Struct: _big_endian_struct_class}
    for name in STRUCT_FUNCTIONS:
        setattr(fake, name, _native_is_big(getattr(_struct, name)))
        replacements[getattr(struct, name)] = getattr(fake, name)
    fake.Struct = _big_endian_struct_class  # type: ignore[attr-defined]
    fake.error = struct.error  # type: ignore[attr-defined]
    for module in all_modules():
        for name, value in list(vars(module).items()):
            if value is struct:
                monkeypatch.setattr(module, name, fake)
            elif callable(value) and _hashable(value) and value in replacements:
                monkeypatch.setattr(module, name, replacements[value])
    for name in (*STRUCT_FUNCTIONS, "Struct"):
        monkeypatch.setattr(struct, name, getattr(fake, name))
    monkeypatch.setattr(sys, "byteorder", "big")


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@pytest.fixture
def big_endian_host(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_big_endian_host(monkeypatch)


@pytest.mark.usefixtures("big_endian_host")
def test_the_simulated_host_is_big_endian() -> None:
    """What the simulation changes, shown on code that does take the host's order."""
    import petitkexec.watchdog

    two = b"\x46\x05"
    assert int.from_bytes(two, sys.byteorder) == 0x4605
    assert struct.unpack("H", two) == (0x4605,)
    assert struct.unpack("=H", two) == (0x4605,)
    assert struct.Struct("@H").unpack(two) == (0x4605,)
    assert struct.unpack("<H", two) == (0x0546,)
    assert petitkexec.watchdog.struct.pack("i", 1) == b"\x00\x00\x00\x01"


def test_this_host_is_little_endian() -> None:
    """The comparison below needs one real little-endian run (x86, arm64, ppc64le)."""
    assert sys.byteorder == "little", "run this on a little-endian host"
    assert struct.unpack("H", b"\x46\x05") == (0x0546,)


# -- every config helper, on both hosts ---------------------------------------------------------


def exercise(sim: SimKernel) -> dict[str, Any]:
    """Every config read and write petitkexec has, on every function: what it read, what it
    wrote (the write log: path, offset, bytes) and each config file afterwards."""
    kernel = sim.kernel
    seen: dict[str, Any] = {}
    # Functions below a bridge first: the Bridge Control value written sets the secondary bus
    # reset bit, which holds everything below in reset (their config reads all ones).
    for function in reversed(sim.functions):
        bdf = Bdf.parse(function.bdf)
        path = sim.device_dir(function.bdf).resolve()

        def read(name: str, path: Path = path) -> str | None:
            try:
                return (path / name).read_text()
            except OSError:
                return None

        header = read_config_header(path)
        reads: dict[str, Any] = {
            "header": header.hex(),
            "le16 vendor": le16(header, 0),
            "le16 device": le16(header, 2),
            "le16 command": le16(header, PCI_COMMAND),
            "le16 cut short": le16(header[:5], PCI_COMMAND),
            "config16 vendor": kernel.read_config16(bdf, 0),
            "config16 device": kernel.read_config16(bdf, 2),
            "command": kernel.read_command(bdf),
            "bridge control": kernel.read_bridge_control(bdf),
            "from sysfs": function_from_sysfs(path),
            "built": build_function(path, read, driver=sim.driver_of(function.bdf), parent=None),
        }
        kernel.write_command(bdf, COMMAND_WRITTEN)
        kernel.write_config16(bdf, SCRATCH_OFFSET, SCRATCH_VALUE)
        if function.bridge:
            kernel.write_bridge_control(bdf, BRIDGE_CONTROL_WRITTEN)
        reads["command after"] = kernel.read_command(bdf)
        reads["scratch after"] = kernel.read_config16(bdf, SCRATCH_OFFSET)
        reads["bridge control after"] = kernel.read_bridge_control(bdf)
        reads["config after"] = (sim.device_dir(function.bdf) / "config").read_bytes()
        seen[function.bdf] = reads
    seen["writes"] = sim.writes()
    return seen


def test_config_helpers_give_the_same_on_a_big_endian_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    functions = q35_like()
    little = exercise(SimKernel(tmp_path / "little" / "sys", functions))
    with monkeypatch.context() as patch:
        simulate_big_endian_host(patch)
        big = exercise(SimKernel(tmp_path / "big" / "sys", functions))
    assert sys.byteorder == "little" and struct.unpack("H", b"\x01\x00") == (1,)
    assert big == little
    expect_what_the_devices_hold(little, functions)


def expect_what_the_devices_hold(seen: dict[str, Any], functions: list[SimFunction]) -> None:
    """The values read are the simulated devices' (built little-endian by tests/simkernel.py,
    as the kernel hands them out), and the bytes written are little-endian."""
    assert any(f.bridge for f in functions) and any(f.physfn for f in functions)
    for function in functions:
        reads = seen[function.bdf]
        vendor, device = (0xFFFF, 0xFFFF) if function.physfn else (function.vendor, function.device)
        header_type = (0x80 if function.multifunction else 0) | (1 if function.bridge else 0)
        assert reads["le16 vendor"] == reads["config16 vendor"] == vendor, function.bdf
        assert reads["le16 device"] == reads["config16 device"] == device, function.bdf
        assert reads["le16 command"] == reads["command"] == function.command, function.bdf
        assert reads["le16 cut short"] is None
        assert reads["bridge control"] == 0
        assert bytes.fromhex(reads["header"])[PCI_HEADER_TYPE] == header_type
        for built in (reads["from sysfs"], reads["built"]):
            assert built.command == function.command, function.bdf
            assert built.header_type == header_type, function.bdf
            assert built.is_bridge == function.bridge, function.bdf
        assert reads["command after"] == COMMAND_WRITTEN
        assert reads["scratch after"] == SCRATCH_VALUE
        config = reads["config after"]
        assert config[PCI_COMMAND : PCI_COMMAND + 2] == b"\x46\x05"
        assert config[SCRATCH_OFFSET : SCRATCH_OFFSET + 2] == b"\xef\xbe"
        if function.bridge:
            assert reads["bridge control after"] == BRIDGE_CONTROL_WRITTEN
            assert config[PCI_BRIDGE_CONTROL : PCI_BRIDGE_CONTROL + 2] == b"\x53\x0a"
    config_writes = [
        (w["path"].split("/")[3], w["offset"], w["data"])
        for w in seen["writes"]
        if w["path"].endswith("/config")
    ]
    bridges = [f.bdf for f in reversed(functions) if f.bridge]
    assert config_writes == [
        write
        for f in reversed(functions)
        for write in [
            (f.bdf, PCI_COMMAND, "4605"),
            (f.bdf, SCRATCH_OFFSET, "efbe"),
            *([(f.bdf, PCI_BRIDGE_CONTROL, "530a")] if f.bridge else []),
        ]
    ]
    # The simulated kernel saw the reset bit where the kernel looks for it: the low byte.
    assert sim_events(seen) == [f"{bdf} raw-sbr" for bdf in bridges]


def sim_events(seen: dict[str, Any]) -> list[str]:
    return [
        f"{w['path'][6:]} {w['data']}" for w in seen["writes"] if w["path"].startswith("event/")
    ]


# -- nothing in the package takes the host's byte order -----------------------------------------


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _literal(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def host_order_uses(name: str, source: str) -> list[tuple[str, str, object, int]]:
    """(file, what, format or order, line) for every use that could take the host's order."""
    tree = ast.parse(source, name)
    from_struct = {
        alias.asname or alias.name: f"struct.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "struct"
        for alias in node.names
    }
    found: list[tuple[str, str, object, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("sys", "array"):
            for alias in node.names:
                if node.module == "array" or alias.name == "byteorder":
                    what = f"from {node.module} import {alias.name}"
                    found.append((name, what, None, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "array":
                    found.append((name, "import array", None, node.lineno))
        elif isinstance(node, ast.Attribute) and _dotted(node) == "sys.byteorder":
            found.append((name, "sys.byteorder", None, node.lineno))
        elif isinstance(node, ast.Call):
            found += _call_uses(name, node, from_struct)
    return sorted(found, key=lambda use: (use[3], use[1]))


def _call_uses(
    name: str, node: ast.Call, from_struct: dict[str, str]
) -> list[tuple[str, str, object, int]]:
    call = from_struct.get(_dotted(node.func), _dotted(node.func))
    last = call.rsplit(".", 1)[-1]
    first = _literal(node.args[0]) if node.args else None
    if last in ("from_bytes", "to_bytes"):
        keywords = {k.arg: k.value for k in node.keywords}
        second = node.args[1] if len(node.args) > 1 else None
        order = _literal(keywords.get("byteorder", second))
        return [] if order == "little" else [(name, last, order, node.lineno)]
    if call.startswith("struct.") and last in (*STRUCT_FUNCTIONS, "Struct"):
        text = first.decode() if isinstance(first, bytes) else first
        ordered = isinstance(text, str) and text[:1] in ORDERED
        return [] if ordered or last == "calcsize" else [(name, call, text, node.lineno)]
    if last == "cast" and isinstance(node.func, ast.Attribute):
        return [(name, "memoryview.cast", first, node.lineno)]
    return []


def package_uses() -> list[tuple[str, str, object, int]]:
    return [
        use
        for path in sorted(PACKAGE.rglob("*.py"))
        for use in host_order_uses(
            path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8")
        )
    ]


def test_no_code_takes_the_byte_order_from_the_host() -> None:
    uses = package_uses()
    unexplained = [use for use in uses if use[:3] not in NATIVE_ORDER_ALLOWED]
    assert not unexplained, (
        "these take the CPU's byte order; config space is little-endian on every CPU "
        f"(name it: 'little', '<H'), or explain the use in NATIVE_ORDER_ALLOWED: {unexplained}"
    )
    stale = set(NATIVE_ORDER_ALLOWED) - {use[:3] for use in uses}
    assert not stale, f"NATIVE_ORDER_ALLOWED lists uses that are gone: {stale}"


def test_the_static_check_sees_the_host_order() -> None:
    source = (
        "import struct, sys, array\n"
        "from struct import unpack as u\n"
        "a = int.from_bytes(data, sys.byteorder)\n"
        "b = value.to_bytes(2)\n"
        "c = struct.unpack('H', data) + struct.Struct(b'=H').unpack(data)\n"
        "d = u('<H', data) + u('@I', data) + struct.pack('>I', 1) + struct.calcsize('H')\n"
        "e = int.from_bytes(data, byteorder='little') + value.to_bytes(2, 'little')\n"
        "f = memoryview(data).cast('H')\n"
    )
    found = [(what, order, line) for _, what, order, line in host_order_uses("x.py", source)]
    assert found == [
        ("import array", None, 1),
        ("from_bytes", None, 3),
        ("sys.byteorder", None, 3),
        ("to_bytes", None, 4),
        ("struct.Struct", "=H", 5),
        ("struct.unpack", "H", 5),
        ("struct.unpack", "@I", 6),
        ("memoryview.cast", "H", 8),
    ]
