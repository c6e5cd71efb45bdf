"""``prepare_cache``: TorchIO-equal voxels, the index fields, idempotent re-runs, failures that stay alone."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maesil.data.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CacheIndex,
    is_cache,
    load_cached_subject,
    prepare_cache,
)
from maesil.data.cache.index import read_subjects
from maesil.data.io import subject_from_record
from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import DataError, SubjectRecord

from .conftest import SETTINGS, records_of


def test_round_trip_equals_torchio_preprocessing(prepared) -> None:
    out, records, report = prepared
    assert sorted(report.prepared) == [r.subject_id for r in records] and not report.failed
    index = CacheIndex.load(out)
    assert index.settings == SETTINGS and set(index.entries) == {r.subject_id for r in records}
    for record in records:
        expected = SETTINGS.transform()(subject_from_record(record, with_label=True))
        entry = index.entries[record.subject_id]
        image = np.load(entry.image_path)
        label = np.load(entry.label_path)
        assert image.dtype == np.float32 and image.flags.c_contiguous and label.dtype == np.uint8
        assert np.array_equal(image, expected["image"].data[0].numpy())
        assert np.array_equal(label, expected["label"].data[0].numpy())
        assert np.array_equal(entry.affine_array, expected["image"].affine)
        assert entry.shape == tuple(expected.spatial_shape)
        assert entry.spacing == pytest.approx(expected["image"].spacing)
        assert entry.original_shape == (48, 48, 24) and entry.original_spacing == pytest.approx((4.0, 4.0, 8.0))
        assert entry.label_values == tuple(int(v) for v in np.unique(label))
        assert entry.label_counts == tuple(int((label == v).sum()) for v in entry.label_values)
        subject = load_cached_subject(index, record.subject_id, with_label=True)
        assert torch.equal(subject["image"].data, expected["image"].data)
        assert np.array_equal(subject["label"].affine, expected["label"].affine)
        assert subject["subject_id"] == record.subject_id


def test_index_json_fields(prepared) -> None:
    out, records, _ = prepared
    assert is_cache(out) and not is_cache(out / "subjects")
    data = json.loads((out / "index.json").read_text())
    assert data["format"] == CACHE_FORMAT and data["version"] == CACHE_VERSION
    assert data["settings"] == SETTINGS.to_dict() and data["subjects"] == "index.sqlite"
    data["subjects"] = read_subjects(out, data)
    entry = data["subjects"][records[0].subject_id]
    assert set(entry) >= {"image", "label", "label_points", "shape", "spacing", "affine", "original_shape",
                          "original_spacing", "original_affine", "source", "stats", "label_values", "split"}
    assert entry["image"] == f"subjects/{records[0].subject_id}/image.npy"
    assert entry["source"]["image"] == str(records[0].image) and entry["source"]["label"] == str(records[0].label)
    assert entry["source"]["series_uid"] is None
    stat = records[0].image.stat()
    assert entry["source"]["fingerprint"]["image"] == {"kind": "file", "size": stat.st_size,
                                                       "mtime_ns": stat.st_mtime_ns}
    assert set(entry["stats"]) == {"min", "max", "mean", "std", "foreground_fraction"}
    stats = entry["stats"]
    assert stats["min"] == 0.0 and stats["max"] == 1.0 and 0 < stats["foreground_fraction"] < 1
    assert np.array(entry["affine"]).shape == (4, 4) and np.array(entry["original_affine"]).shape == (4, 4)
    assert [data["subjects"][r.subject_id]["split"] for r in records] == ["train", "val", None]
    with np.load(out / entry["label_points"]) as points:
        assert list(points["values"]) == entry["label_values"]
        for value in entry["label_values"]:
            coords = points[f"points_{value}"]
            assert coords.dtype == np.int32 and coords.shape[1] == 3 and 0 < len(coords) <= 4096
            label = np.load(out / entry["label"])
            assert (label[tuple(coords.T)] == value).all()


def test_second_run_skips_and_touched_source_is_reprepared(own_copy: Path, tmp_path: Path) -> None:
    records = records_of(own_copy)
    out = tmp_path / "cache"
    first = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert len(first.prepared) == 3
    again = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert again.prepared == [] and sorted(again.skipped) == [r.subject_id for r in records]
    stat = records[1].image.stat()
    os.utime(records[1].image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    third = prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    assert third.prepared == [records[1].subject_id] and len(third.skipped) == 2
    # a subject no longer among the records leaves the index and its files are deleted
    fourth = prepare_cache(records[:2], out, SETTINGS, workers=1, progress=False)
    assert fourth.removed == [records[2].subject_id] and len(fourth.skipped) == 2
    assert set(CacheIndex.load(out).entries) == {r.subject_id for r in records[:2]}
    assert not (out / "subjects" / records[2].subject_id).exists()


def test_other_settings_are_refused_unless_forced(tiny_ct_dir: Path, tmp_path: Path) -> None:
    records = records_of(tiny_ct_dir)[:1]
    out = tmp_path / "cache"
    prepare_cache(records, out, SETTINGS, workers=1, progress=False)
    other = PreprocessSettings(modality="ct", target_spacing=(8.0, 8.0, 8.0))
    with pytest.raises(DataError, match="other settings.*--out.*--force") as info:
        prepare_cache(records, out, other, workers=1, progress=False)
    assert str(out / "index.json") in str(info.value)
    report = prepare_cache(records, out, other, workers=1, progress=False, force=True)
    assert report.prepared == [records[0].subject_id]
    index = CacheIndex.load(out)
    assert index.settings == other and index.entries[records[0].subject_id].spacing == (8.0, 8.0, 8.0)
    with pytest.raises(DataError, match="prepared with"):
        index.require_settings(SETTINGS)


def test_corrupt_and_missing_files_fail_alone(own_copy: Path, tmp_path: Path) -> None:
    records = records_of(own_copy)
    corrupt = records[0].image
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated gzip
    missing = SubjectRecord("ghost", own_copy / "images" / "ghost.nii.gz")
    report = prepare_cache([*records, missing], tmp_path / "cache", SETTINGS, workers=1, progress=False)
    assert sorted(report.prepared) == [r.subject_id for r in records[1:]]
    assert set(report.failed) == {records[0].subject_id, "ghost"}
    assert str(corrupt) in report.failed[records[0].subject_id]
    assert str(missing.image) in report.failed["ghost"]
    assert set(CacheIndex.load(tmp_path / "cache").entries) == {r.subject_id for r in records[1:]}
