"""The cache index: loading, its checks, and the problems a run answers from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from maesil.data.cache import CACHE_FORMAT, CACHE_VERSION, CachedPatchDataset, CacheIndex, cache_problems
from maesil.data.cache.index import SUBJECTS_TABLE, read_subjects, write_subjects
from maesil.data.records import DataError

from .conftest import SETTINGS


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
    CacheIndex.load(broken)  # files are not looked at when opening (the read names a missing one) ...
    with pytest.raises(DataError, match=str(entry.label_path)):
        CacheIndex.load(broken, check_files=True)  # ... unless asked to


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_subject_table_stops_the_open_naming_it(prepared, tmp_path: Path, damage: str) -> None:
    out, _, _ = prepared
    cache = Path(shutil.copytree(out, tmp_path / "cache"))
    table = cache / SUBJECTS_TABLE
    if damage == "truncated":
        table.write_bytes(table.read_bytes()[:table.stat().st_size // 2])
    elif damage == "garbage":
        table.write_bytes(b"not a database" * 100)
    else:
        table.unlink()
    with pytest.raises(DataError, match=f"{table}: "):
        CacheIndex.load(cache)


def test_an_invalid_entry_is_named_with_its_subject(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                     "settings": SETTINGS.to_dict(), "subjects": SUBJECTS_TABLE}))
    write_subjects(tmp_path / SUBJECTS_TABLE, {"case_7": {"image": "subjects/case_7/image.b2nd"}})
    index = CacheIndex.load(tmp_path)
    assert list(index.entries) == ["case_7"] and "case_7" in index.entries and "case_8" not in index.entries
    with pytest.raises(DataError, match=rf"{tmp_path / SUBJECTS_TABLE}: invalid entry for subject 'case_7'"):
        index["case_7"]
    with pytest.raises(DataError, match="no subject 'case_8'"):
        index["case_8"]


def test_an_index_of_50000_subjects_opens_without_reading_the_entries(prepared, tmp_path: Path) -> None:
    """A synthetic index (no volumes): opening reads the ids; an entry is parsed when asked for."""
    import pickle

    out, _, _ = prepared
    template = read_subjects(out, {"version": CACHE_VERSION})
    entry = next(iter(template.values()))
    subjects = {f"s{i:05d}": {**entry, "image": f"subjects/s{i:05d}/image.b2nd", "shape": [i % 97 + 1, 2, 3]}
                for i in range(50_000)}
    shutil.copy(out / "index.json", tmp_path / "index.json")
    write_subjects(tmp_path / SUBJECTS_TABLE, subjects)
    index = CacheIndex.load(tmp_path)
    assert len(index) == 50_000 and next(iter(index.entries)) == "s00000"
    assert index["s49999"].shape == (49999 % 97 + 1, 2, 3)
    assert index["s49999"].image_path == tmp_path / "subjects/s49999/image.b2nd"
    # what a DataLoader worker receives: the table's path and 8 bytes per subject, no parsed entry
    dataset = CachedPatchDataset(index, list(index.entries)[::-1], 16, samples_per_volume=2)
    assert len(dataset) == 100_000 and len(pickle.dumps(dataset)) < 8 * 50_000 + 4096
    worker = pickle.loads(pickle.dumps(dataset))
    with pytest.raises(DataError, match=f"subject 's49999': {tmp_path / 'subjects/s49999/image.b2nd'}: cached"
                                        " volume is missing"):
        worker[0]  # the synthetic index has no volumes


def test_cache_problems_from_the_index(prepared) -> None:
    out, _, _ = prepared
    entries = list(CacheIndex.load(out).entries.values())
    assert cache_problems(entries, (16, 16, 16), classes=list(range(8)), needs_labels=True) == []
    problems = cache_problems(entries, (64, 16, 16), classes=[0, 1])
    assert {p.severity for p in problems} == {"error", "warning"}
    assert any("outside the declared classes" in p.message and p.path == entries[0].source.label for p in problems)
    assert any("smaller than one superpatch" in p.message for p in problems)
