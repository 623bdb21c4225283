"""Profiles and calibrations say which engine code they measured (engine.digest): a committed one must match
the checkout's code, unless its meta marks it knowingly stale and says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servebench.engine.digest import KNOWN_STALE, code_only, source_digest, stale_warning

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(path for name in ("meta.json", "calibration.json")
                   for path in REPO.glob(f"data/profiles/*/*/{name}"))


def meta_of(path: Path) -> dict:
    raw = json.loads(path.read_text())
    return raw.get("meta", {}) if path.name == "calibration.json" else raw


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_profile_describes_this_code(path):
    meta = meta_of(path)
    if KNOWN_STALE in meta:
        assert meta[KNOWN_STALE].strip(), f"{path}: say why it is kept stale"
        return
    assert meta.get("source_digest") == source_digest(), (
        f"{path} measured engine code {meta.get('source_digest')}, the checkout's is {source_digest()}: "
        f"re-profile (python -m servebench.engine.profile) and recalibrate (workbench-calibrate), or add "
        f"\"{KNOWN_STALE}\": \"why\" to its meta")


def test_digest_ignores_prose_but_not_code():
    code = 'def f(x):\n    """Doc."""\n    return x + 1  # why\n'
    reworded = '# header\ndef f(x):\n\n    """Other\n    doc."""\n    return x + 1\n'
    assert code_only(code) == code_only(reworded)
    assert code_only(code) != code_only(code.replace("x + 1", "x + 2"))
    assert code_only('s = "not a docstring"\n') == 's = "not a docstring"'


def test_stale_warning_names_the_profile_and_both_digests():
    assert stale_warning("p", {"source_digest": source_digest()}) is None
    assert "records no source digest" in stale_warning("p", {})
    warning = stale_warning("data/profiles/x", {"source_digest": "0123", KNOWN_STALE: "old card"})
    assert warning.startswith("data/profiles/x measured engine code 0123") and "(known: old card)" in warning
