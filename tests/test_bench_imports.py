"""The bench scripts are not run by the suite (they take minutes and print numbers to read),
but each must still import against today's petitkexec: a renamed function breaks one
silently otherwise (bench/inuse_scan.py did, when inuse's test-only wrappers went)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda path: path.name)
def test_each_bench_script_imports(script: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs nothing: each runs its main under __main__ only
    assert callable(module.main)
