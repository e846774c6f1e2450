"""The generated benchmark workload must match the shared workload file exactly."""
from __future__ import annotations

from pathlib import Path

import pytest

from orca.engine.workload import load_workload

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_CANDIDATES = [Path("/work/shared/workload.json"), REPO_ROOT.parent / "shared" / "workload.json"]


def _shared_workload_path() -> Path | None:
    return next((p for p in SHARED_CANDIDATES if p.is_file()), None)


def test_generated_totals() -> None:
    reqs = load_workload(None)
    assert len(reqs) == 200
    assert sum(len(r.prompt_token_ids) for r in reqs) == 54_916
    assert sum(r.max_tokens for r in reqs) == 26_374


def test_generated_matches_file() -> None:
    path = _shared_workload_path()
    if path is None:
        pytest.skip("shared workload.json not present")
    assert load_workload(None) == load_workload(str(path))
