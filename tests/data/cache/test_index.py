"""The cache index: loading, its checks, and the problems a run answers from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from maesil.data.cache import CACHE_FORMAT, CacheIndex, cache_problems
from maesil.data.records import DataError


def test_load_rejects_missing_or_invalid_caches(prepared, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "index.json")):
        CacheIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a maesil cache"):
        CacheIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": 99, "settings": {},
                                                     "subjects": {}}))
    with pytest.raises(DataError, match="version 99"):
        CacheIndex.load(tmp_path)
    out, _, _ = prepared
    broken = Path(shutil.copytree(out, tmp_path / "broken"))
    entry = next(iter(CacheIndex.load(broken).entries.values()))
    entry.label_path.unlink()
    with pytest.raises(DataError, match=str(entry.label_path)):
        CacheIndex.load(broken)


def test_cache_problems_from_the_index(prepared) -> None:
    out, _, _ = prepared
    entries = list(CacheIndex.load(out).entries.values())
    assert cache_problems(entries, (16, 16, 16), classes=list(range(8)), needs_labels=True) == []
    problems = cache_problems(entries, (64, 16, 16), classes=[0, 1])
    assert {p.severity for p in problems} == {"error", "warning"}
    assert any("outside the declared classes" in p.message and p.path == entries[0].source.label for p in problems)
    assert any("smaller than one superpatch" in p.message for p in problems)
