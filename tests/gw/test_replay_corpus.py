"""Regression from recorded traffic: every capture in ``fixtures/captures/`` is replayed
against the current code; a changed reply (or state) fails with the replay's diff.

A deliberate change is recorded with ``chargegw replay CAPTURE --record-baseline``;
``python -m tests.gw.captures`` regenerates the corpus (docs/replay.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chargegw.capture import read_capture
from chargegw.replay.engine import replay

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "captures"
CAPTURES = sorted(CORPUS.glob("*.jsonl"))
#: the corpus stays small: it is read by every test run and reviewed by people
MAX_CORPUS_BYTES = 400_000


def test_the_corpus_is_there_and_small() -> None:
    names = {path.stem for path in CAPTURES}
    assert {"vendor_ap3000", "vendor_bkv"} <= names
    assert any(name.startswith("ap3000_") for name in names)
    assert any(name.startswith("bkv_") for name in names)
    assert sum(path.stat().st_size for path in CAPTURES) < MAX_CORPUS_BYTES


@pytest.mark.parametrize("path", CAPTURES, ids=[path.stem for path in CAPTURES])
async def test_replaying_the_capture_changes_nothing(path: Path, pg_server_dsn: str) -> None:
    capture = read_capture(path)
    assert not capture.problems, capture.problems

    report = await replay(capture, dsn=pg_server_dsn, source=str(path))

    assert report.summary()["frames_fed"] > 0
    assert not report.differs, f"replay of {path.name} differs:\n" + "\n".join(report.lines())
