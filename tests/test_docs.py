"""The docs and examples stay true: coverage table complete, examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chargeproto import ap3000, bkv

ROOT = Path(__file__).resolve().parents[1]


def test_coverage_table_lists_every_ap3000_message() -> None:
    text = (ROOT / "docs" / "protocol-coverage.md").read_text()
    missing = [
        cls.__name__
        for cls in ap3000.MESSAGE_CLASSES
        if f"| 0x{cls.command:02X} | {cls.direction.value} | `{cls.__name__}` |" not in text
    ]
    assert not missing, f"add to docs/protocol-coverage.md: {missing}"


def bkv_code(cls: type[bkv.BkvMessage]) -> str:
    """The code column: ``0x0000``, ``0x0015/0x07`` or ``0x1000/0x1017``."""
    if cls.key is None:
        return f"0x{cls.command:04X}"
    key = f"0x{cls.key:04X}" if cls.command == 0x1000 else f"0x{cls.key:02X}"
    return f"0x{cls.command:04X}/{key}"


def test_coverage_table_lists_every_bkv_message() -> None:
    text = (ROOT / "docs" / "protocol-coverage.md").read_text()
    section = text[text.index("## BKV") :]
    missing = [
        cls.__name__
        for cls in bkv.MESSAGE_CLASSES
        if f"| {bkv_code(cls)} | {cls.direction.value} | `{cls.__name__}` |" not in section
    ]
    assert not missing, f"add to the BKV section of docs/protocol-coverage.md: {missing}"


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
